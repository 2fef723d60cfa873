"""Confinement (docs/api.md, "Names and confinement"): no endpoint reads a path the caller names
outside the data directory, and collection names and document ids follow one rule (``shared.ids``)
everywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.fmindex.api import router as fmindex_router
from shared.app import create_app
from shared.errors import LodestarError
from shared.ids import (
    check_collection_name,
    is_valid_collection_name,
    is_valid_doc_id,
    staged_file,
    staging_dir,
)
from shared.schemas import Document, IndexSearchRequest
from tests.conftest import make_settings


class RecordingCelery:
    """Stands in for the broker: what the endpoint enqueued is what the worker would read."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def send_task(self, name: str, args: list[Any], **_: Any) -> Any:
        self.sent.append((name, args))
        return type("Result", (), {"id": f"job-{len(self.sent)}"})()


@pytest.fixture
def fm_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, Path, Any]]:
    data_dir = tmp_path / "data"
    celery = RecordingCelery()
    monkeypatch.setattr("shared.jobs.make_celery", lambda _settings: celery)
    app = create_app("fmindex", make_settings(data_dir), [fmindex_router])
    app.state.engine = object()  # the build needs none; read routes must refuse a bad name first
    with TestClient(app) as client:  # runs the lifespan, which marks the service ready
        yield client, data_dir, celery


# --- the naming rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wiki", "eval-scifact", "a", "x_1", "a" * 64])
def test_valid_collection_names(name: str) -> None:
    assert is_valid_collection_name(name)
    assert check_collection_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Wiki", "-x", "../etc", "a/b", "wiki\n", "a" * 65, "wiki ", ".hidden"]
)
def test_invalid_collection_names_are_refused(name: str) -> None:
    # "wiki\n" is the case re.match with "$" used to let through.
    assert not is_valid_collection_name(name)
    with pytest.raises(LodestarError) as caught:
        check_collection_name(name)
    assert caught.value.status == 422 and caught.value.field == "collection"


def test_doc_ids_are_printable_text_up_to_256_characters() -> None:
    assert is_valid_doc_id("10.1000/xyz (2024) é")
    assert not is_valid_doc_id("")
    assert (
        not is_valid_doc_id("a\tb") and not is_valid_doc_id("a\x00") and not is_valid_doc_id("a\n")
    )
    assert not is_valid_doc_id("x" * 257)


def test_the_wire_models_use_the_same_rule() -> None:
    with pytest.raises(ValueError):
        IndexSearchRequest(collection="wiki\n", query="q")
    with pytest.raises(ValueError):
        Document(id="a\x01b", text="t")
    assert IndexSearchRequest(collection="eval-scifact", query="q").collection == "eval-scifact"


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/collections/Bad%20Name/build", {"dataset": "scifact"}),
        ("POST", "/collections/wiki%0A/build", {"dataset": "scifact"}),
        ("GET", "/collections/..etc", None),
    ],
)
def test_bad_collection_names_in_paths_are_422(
    fm_client: tuple[TestClient, Path, Any], method: str, path: str, body: Any
) -> None:
    client, _, celery = fm_client
    response = client.request(method, path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation"
    assert celery.sent == []


# --- the fmindex build takes no paths ----------------------------------------------------------


@pytest.mark.parametrize(
    "jsonl", ["/etc/passwd", "../../etc/passwd", "sub/batch.jsonl", ".batch.jsonl", "batch.txt"]
)
def test_fmindex_build_refuses_a_path(fm_client: tuple[TestClient, Path, Any], jsonl: str) -> None:
    client, _, celery = fm_client
    response = client.post("/collections/wiki/build", json={"jsonl": jsonl})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "jsonl"
    assert celery.sent == []


def test_fmindex_build_refuses_a_symlink_out_of_the_staging_folder(
    fm_client: tuple[TestClient, Path, Any], tmp_path: Path
) -> None:
    client, data_dir, celery = fm_client
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"id": "s", "text": "secret"}\n')
    folder = staging_dir(data_dir)
    folder.mkdir(parents=True)
    (folder / "planted.jsonl").symlink_to(outside)
    response = client.post("/collections/wiki/build", json={"jsonl": "planted.jsonl"})
    assert response.status_code == 404
    assert str(tmp_path) not in response.text
    assert celery.sent == []


def test_fmindex_build_reads_a_staged_file_by_name(fm_client: tuple[TestClient, Path, Any]) -> None:
    client, data_dir, celery = fm_client
    folder = staging_dir(data_dir)
    folder.mkdir(parents=True)
    (folder / "batch-1.jsonl").write_text('{"id": "d1", "text": "one"}\n')
    assert (
        client.post("/collections/wiki/build", json={"jsonl": "missing.jsonl"}).status_code == 404
    )
    response = client.post("/collections/wiki/build", json={"jsonl": "batch-1.jsonl"})
    assert response.status_code == 202, response.text
    [(_, args)] = celery.sent
    assert args == ["wiki", None, str(folder / "batch-1.jsonl")]


def test_fmindex_build_stages_inline_documents(fm_client: tuple[TestClient, Path, Any]) -> None:
    client, data_dir, celery = fm_client
    docs = [{"id": "d1", "title": "One", "text": "first"}, {"id": "d2", "text": "second"}]
    response = client.post("/collections/notes/build", json={"documents": docs})
    assert response.status_code == 202, response.text
    [(_, (collection, dataset, jsonl))] = celery.sent
    path = Path(jsonl)
    assert collection == "notes" and dataset is None
    assert path.parent == staging_dir(data_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d1", "d2"] and rows[0]["title"] == "One"


def test_fmindex_build_keeps_the_last_occurrence_of_a_repeated_id(
    fm_client: tuple[TestClient, Path, Any],
) -> None:
    client, _, celery = fm_client
    dupes = {
        "documents": [{"id": "a", "text": "1"}, {"id": "b", "text": "x"}, {"id": "a", "text": "2"}]
    }
    assert client.post("/collections/x/build", json=dupes).status_code == 202
    [(_, (_, _, jsonl))] = celery.sent
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in rows] == [("a", "2"), ("b", "x")]


def test_fmindex_build_takes_only_known_datasets_and_one_source(
    fm_client: tuple[TestClient, Path, Any],
) -> None:
    client, _, celery = fm_client
    assert client.post("/collections/x/build", json={"dataset": "../x"}).status_code == 422
    both = {"dataset": "scifact", "jsonl": "a.jsonl"}
    assert client.post("/collections/x/build", json=both).status_code == 422
    assert client.post("/collections/x/build", json={}).status_code == 422
    assert celery.sent == []
    assert client.post("/collections/x/build", json={"dataset": "scifact"}).status_code == 202
    assert celery.sent[0][1] == ["x", "scifact", None]


def test_staged_file_never_leaves_the_staging_folder(tmp_path: Path) -> None:
    for name in ("../data.jsonl", "/abs.jsonl", "a/../../b.jsonl"):
        with pytest.raises(LodestarError) as caught:
            staged_file(tmp_path, name)
        assert caught.value.status == 422
