"""A published collection whose files no longer match their checksums is refused by the index
process that loads it (503 ``unavailable``, no absolute path in the message), not served; the
other collections keep answering. The checksums were written when the version was sealed."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from services.index.engine import IndexEngine
from shared.artifacts import ArtifactFamily
from shared.models import get_embedder
from shared.schemas import Document
from tests.conftest import free_port, make_settings, spawn, stack_env, wait_ready


def test_the_index_refuses_a_tampered_collection_and_serves_the_others(
    built_data_dir: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(built_data_dir, data_dir)
    collections = data_dir / "collections"
    shutil.copytree(collections / "wiki", collections / "wiki-copy")
    family = ArtifactFamily(collections / "wiki-copy")
    version = family.current_version()
    assert version is not None
    passages = family.versions_dir / version / "passages.jsonl"
    passages.write_bytes(passages.read_bytes().replace(b"Mona", b"Mono", 1))
    # A collection with a write segment (w00001.*) serves from another process, which
    # checks the linked base and the segment; a tampered segment file is refused the same way.
    shutil.copytree(collections / "wiki", collections / "wiki-seg")
    engine = IndexEngine(data_dir, lambda: get_embedder(make_settings(data_dir)))
    engine.upsert("wiki-seg", [Document(id="Zorblax", title="Zorblax", text="a purple moon")])
    shutil.copytree(collections / "wiki-seg", collections / "wiki-seg-bad")
    bad = ArtifactFamily(collections / "wiki-seg-bad")
    segment = bad.versions_dir / str(bad.current_version()) / "w00001.passages.jsonl"
    segment.write_bytes(segment.read_bytes().replace(b"purple", b"purpel"))

    port = free_port()
    env = stack_env(data_dir, LODESTAR_INDEX_PORT=str(port))
    index = spawn("index", ["-m", "services.index"], env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, index)
        query = {"query": "Mona Lisa", "k": 1}
        sound = httpx.post(f"{url}/search", json={**query, "collection": "wiki"}, timeout=60)
        assert sound.status_code == 200 and sound.json()["results"]["dense"], sound.text
        refused = httpx.post(f"{url}/search", json={**query, "collection": "wiki-copy"}, timeout=60)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unavailable"
        assert "passages.jsonl does not match its checksum" in error["message"]
        assert str(tmp_path) not in refused.text
        moon = {"query": "purple moon", "k": 1, "retrievers": ["bm25"]}
        served = httpx.post(f"{url}/search", json={**moon, "collection": "wiki-seg"}, timeout=60)
        assert served.json()["results"]["bm25"][0]["doc_id"] == "Zorblax", served.text
        refused = httpx.post(
            f"{url}/search", json={**moon, "collection": "wiki-seg-bad"}, timeout=60
        )
        assert refused.status_code == 503, refused.text
        message = refused.json()["error"]["message"]
        assert "w00001.passages.jsonl does not match its checksum" in message
        ready = httpx.get(f"{url}/readyz").json()
        assert "wiki-copy" in str(ready) and "wiki-copy" not in ready.get("collections", [])
    finally:
        index.stop()
