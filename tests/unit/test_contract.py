"""The error contract every service shares (docs/api.md, "Errors" and "What the OpenAPI documents
state"): 405 with ``Allow`` and its own code, error bodies and ``/readyz`` without paths or
exception text, every route documenting the statuses it can answer with the error schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from shared.app import create_app
from shared.errors import ErrorCode, LodestarError, public_message
from tests.conftest import make_settings


def build(tmp_path: Path, **ready: Any) -> TestClient:
    router = APIRouter()

    @router.get("/things/{name}")
    async def get_thing(name: str) -> dict[str, str]:
        return {"name": name}

    @router.delete("/things/{name}")
    async def delete_thing(name: str) -> dict[str, str]:
        return {"deleted": name}

    @router.get("/read")
    async def read() -> dict[str, str]:
        # A file error an engine forgot to map: the handler must not echo its text.
        return {"text": (tmp_path / "no" / "such.json").read_text()}

    @router.get("/engine-error")
    async def engine_error() -> None:
        raise LodestarError(ErrorCode.not_found, f"no manifest at {tmp_path}/index/wiki/CURRENT")

    def warm_up(readiness: Any) -> None:
        readiness.set_ready(**ready)

    return TestClient(create_app("demo", make_settings(tmp_path), [router], warm_up=warm_up))


def test_405_names_every_allowed_method_and_has_its_own_code(tmp_path: Path) -> None:
    with build(tmp_path) as client:
        response = client.put("/things/a", json={})
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        # GET and DELETE are separate routes on one path: Allow must name both.
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert {"GET", "DELETE"} <= allowed and "PUT" not in allowed
        assert client.get("/things/a").status_code == 200


def test_unknown_path_is_404_not_405(tmp_path: Path) -> None:
    with build(tmp_path) as client:
        response = client.put("/nothing/here")
        assert response.status_code == 404 and "allow" not in response.headers
        assert response.json()["error"]["code"] == "not_found"


def test_a_file_error_returns_no_path_and_no_exception_text(tmp_path: Path) -> None:
    with TestClient(build(tmp_path).app, raise_server_exceptions=False) as client:
        response = client.get("/read")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal"
        assert "/" not in error["message"] and "FileNotFoundError" not in response.text
        assert response.headers["x-request-id"] in error["message"]


def test_engine_messages_lose_their_paths(tmp_path: Path) -> None:
    with build(tmp_path) as client:
        error = client.get("/engine-error").json()["error"]
        assert error["code"] == "not_found"
        assert str(tmp_path) not in error["message"] and "<path>" in error["message"]


def test_readyz_has_a_code_and_no_paths(tmp_path: Path) -> None:
    with build(tmp_path, index_dir=str(tmp_path / "index"), collections=["wiki"]) as client:
        body = client.get("/readyz").json()
        assert body["ready"] is True and body["code"] == "ready"
        assert str(tmp_path) not in str(body) and body["collections"] == ["wiki"]


@pytest.mark.parametrize(
    "message,expected",
    [
        ("see POST /collections/wiki/dsi/index", "see POST /collections/wiki/dsi/index"),
        ("file /tmp/x/y.json is corrupt", "file <path> is corrupt"),
        ("'/usr/lib/python3/site.py', line 3", "'<path>', line 3"),
        ("http://index:8001/tmp/search failed", "http://index:8001/tmp/search failed"),
    ],
)
def test_public_message_keeps_routes_and_urls(message: str, expected: str) -> None:
    assert public_message(message) == expected


def test_every_route_documents_the_error_schema(tmp_path: Path) -> None:
    schema = build(tmp_path).app.openapi()
    operation = schema["paths"]["/things/{name}"]["get"]
    for status in ("401", "413", "422", "429", "500", "503", "504"):
        content = operation["responses"][status]["content"]["application/json"]["schema"]
        assert content == {"$ref": "#/components/schemas/ErrorBody"}, status
    codes = schema["components"]["schemas"]["ErrorCode"]["enum"]
    assert "method_not_allowed" in codes and "HTTPValidationError" not in str(operation)


# --- every service's own document --------------------------------------------------------------

SERVICE_ROUTERS = {
    "index": ["services.index.api"],
    "fmindex": ["services.fmindex.api"],
    "dsi": ["services.dsi.api"],
    "reranker": ["services.reranker.api"],
    "rewriter": ["services.rewriter.api"],
    "critic": ["services.critic.api"],
    "generator": ["services.generator.api"],
    "orchestrator": ["services.orchestrator.api", "services.orchestrator.feedback_api"],
}


@pytest.mark.parametrize("service", sorted(SERVICE_ROUTERS))
def test_each_service_documents_its_errors_with_the_error_schema(
    service: str, tmp_path: Path
) -> None:
    """Built from the services' real routers (no engines needed to render the document)."""
    import importlib

    routers = [importlib.import_module(m).router for m in SERVICE_ROUTERS[service]]
    schema = create_app(service, make_settings(tmp_path), routers).openapi()
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "delete", "patch")
    ]
    assert operations
    for path, method, op in operations:
        responses = op["responses"]
        for status in ("401", "413", "422", "429", "500", "503", "504"):
            body = responses[status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert "HTTPValidationError" not in schema.get("components", {}).get("schemas", {})
    # Names in paths carry the one naming rule.
    for path, _, op in operations:
        for param in op.get("parameters", []):
            if param["in"] == "path" and param["name"] == "name":
                assert param["schema"]["pattern"] == "^[a-z0-9][a-z0-9_-]{0,63}$", path


@pytest.mark.parametrize(
    "service,method,path,allowed",
    [
        ("critic", "PUT", "/judge", {"POST"}),
        ("index", "POST", "/collections/wiki", {"GET"}),
        # The lookup is not under .../documents/, where DELETE {doc_id:path} would match it too.
        ("index", "DELETE", "/collections/wiki/lookup", {"POST"}),
        ("index", "PATCH", "/collections/wiki/documents/lookup", {"DELETE"}),
        ("orchestrator", "PATCH", "/collections/wiki/documents/d1", {"DELETE"}),
    ],
)
def test_real_services_answer_405_with_allow(
    service: str, method: str, path: str, allowed: set[str], tmp_path: Path
) -> None:
    import importlib

    routers = [importlib.import_module(m).router for m in SERVICE_ROUTERS[service]]
    with TestClient(create_app(service, make_settings(tmp_path), routers)) as client:
        response = client.request(method, path)
        assert response.status_code == 405, response.text
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


# --- what the schema cannot state: batches and stated rules ------------------------------------

BATCH_MODELS = [
    ("services.dsi.api", "DsiIndexRequest"),
    ("services.fmindex.api", "BuildRequest"),
    ("services.orchestrator.api", "UpsertDocumentsRequest"),
    ("shared.schemas", "UpsertRequest"),  # the index's PUT .../documents
]


@pytest.mark.parametrize("module,model", BATCH_MODELS)
def test_a_batch_naming_an_id_twice_keeps_its_last_occurrence(module: str, model: str) -> None:
    """``uniqueItems`` cannot say "ids unique", so every batch is valid and means a sequence of
    upserts: the last occurrence's content, at the first one's place (``shared.ids.IdBatch``)."""
    import importlib

    from shared.ids import BATCH_IDS_RULE

    cls = getattr(importlib.import_module(module), model)
    documents = [
        {"id": "a", "text": "first"},
        {"id": "b", "text": "other"},
        {"id": "a", "text": "last"},
    ]
    body = cls.model_validate({"documents": documents})
    assert [(d.id, d.text) for d in body.documents] == [("a", "last"), ("b", "other")]
    assert BATCH_IDS_RULE in str(cls.model_json_schema()["properties"]["documents"])


def test_rules_the_schema_cannot_state_are_in_the_422(tmp_path: Path) -> None:
    """A route's rules against state or across fields are listed in its 422 (``x-lodestar-rules``,
    what the contract test accepts); a valid request meeting invalid state documents 409."""
    import importlib

    routers = [importlib.import_module(m).router for m in SERVICE_ROUTERS["orchestrator"]]
    paths = create_app("orchestrator", make_settings(tmp_path), routers).openapi()["paths"]
    rerun = paths["/traces/{trace_id}/rerun"]["post"]["responses"]["422"]
    assert {"from_stage", "overrides.pin"} <= set(rerun["x-lodestar-rules"])
    assert "Rules the schema cannot state" in rerun["description"]
    assert rerun["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    offline = paths["/jobs/offline-update"]["post"]["responses"]
    assert "409" in offline and "conflict" in offline["409"]["description"]
