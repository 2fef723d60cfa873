"""Layers point one way: ``lodestar/`` → ``services/`` → ``shared/``, and a service reaches
another only through its engine (in-process backends) or over HTTP, never through its ``api`` or
``app`` module. Every import counts, function-local ones too (they hid a cycle once)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for alias in node.names:  # `from services.x import api` names a module too
                yield node.lineno, f"{node.module}.{alias.name}"


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        own_service = relative.parts[1] if package == "services" else None
        for line, module in imports(path):
            parts = module.split(".")
            upward = parts[0] == "lodestar" or (package == "shared" and parts[0] == "services")
            cross_service_http = (
                package == "services"
                and parts[0] == "services"
                and len(parts) >= 3
                and parts[1] != own_service
                and parts[2] in ("api", "app")
            )
            if upward or cross_service_http:
                found.append(f"{relative}:{line} imports {module}")
    return found


def test_shared_imports_neither_services_nor_lodestar() -> None:
    assert violations("shared") == []


def test_services_import_no_lodestar_and_no_other_services_http_layer() -> None:
    assert violations("services") == []


def test_the_check_sees_function_local_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from services.index.api import router\n    import lodestar\n")
    assert [m for _, m in imports(module)] == [
        "services.index.api",
        "services.index.api.router",
        "lodestar",
    ]
