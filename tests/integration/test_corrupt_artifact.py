"""A published collection whose files no longer match their checksums is refused by the index
process that loads it (503 ``unavailable``, no absolute path in the message), not served; the
other collections keep answering. The checksums were written when the version was sealed."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from shared.artifacts import ArtifactFamily
from tests.conftest import free_port, spawn, stack_env, wait_ready


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
        ready = httpx.get(f"{url}/readyz").json()
        assert "wiki-copy" in str(ready) and "wiki-copy" not in ready.get("collections", [])
    finally:
        index.stop()
