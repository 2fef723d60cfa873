"""Keys the way compose and Kubernetes deliver them (docs/api.md, "Keys and roles"):
`lodestar keys init` writes the secret files, the index and the orchestrator run as real
processes in production mode reading them from a secrets folder (deploy/compose.keys.yml mounts
the same files at /run/secrets, deploy/k8s at LODESTAR_SECRETS_DIR), and no key is in any
environment variable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lodestar.keys import ADMIN_KEY_FILE, READ_KEY_FILE, SECRET_FILES
from shared.settings import SECRETS_DIR_ENV
from tests.conftest import ROOT, stack_env, start_stack


def keys_init(directory: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "lodestar.cli", "keys", "init", str(directory)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def secrets_stack(
    built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, Path]]:
    root = tmp_path_factory.mktemp("secret-keys")
    data_dir = root / "data"
    shutil.copytree(built_data_dir, data_dir)
    secrets = root / "secrets"
    keys_init(secrets)
    with start_stack(
        data_dir,
        root,
        LODESTAR_ENV="production",
        LODESTAR_ANSWER_MAX_NEW_TOKENS="8",
        LODESTAR_SECRETS_DIR=str(secrets),  # SECRETS_DIR_ENV
    ) as stack:
        yield stack.orchestrator_url, stack.index_url, secrets


def test_keys_init_writes_the_mounted_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    keys_init(tmp_path / "s")
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert names == {*SECRET_FILES, ADMIN_KEY_FILE, READ_KEY_FILE}
    assert (tmp_path / "s" / ADMIN_KEY_FILE).stat().st_mode & 0o077 == 0  # the owner's only
    before = (tmp_path / "s" / ADMIN_KEY_FILE).read_text()
    with pytest.raises(subprocess.CalledProcessError):
        keys_init(tmp_path / "s")
    assert (tmp_path / "s" / ADMIN_KEY_FILE).read_text() == before


def test_services_read_their_keys_from_secret_files(secrets_stack: tuple[str, str, Path]) -> None:
    orchestrator, index, secrets = secrets_stack
    read_key = (secrets / READ_KEY_FILE).read_text().strip()
    admin_key = (secrets / ADMIN_KEY_FILE).read_text().strip()
    query = {"query": "Who painted the Mona Lisa?", "k": 3}

    assert httpx.post(f"{orchestrator}/search", json=query).status_code == 401
    found = httpx.post(
        f"{orchestrator}/search",
        json=query,
        headers={"authorization": f"Bearer {read_key}"},
        timeout=60,
    )
    # Every service mounts the same files, so the index knows the same keys; the orchestrator has
    # no key of its own but the service key it read from lodestar_service_api_key, so hits (not
    # "index" degraded) mean that key reached the index.
    assert found.status_code == 200, found.text
    assert found.json()["hits"] and "index" not in found.json()["degraded"]
    assert found.json()["hits"][0]["doc_id"] == "Mona Lisa"
    direct = {"query": "Mona Lisa", "collection": "wiki", "k": 1}
    assert httpx.post(f"{index}/search", json=direct).status_code == 401
    doc = {"documents": [{"id": "k1", "title": "Keys", "text": "A document about keys."}]}
    path = f"{index}/collections/wiki/documents"
    write = httpx.put(path, json=doc, headers={"authorization": f"Bearer {read_key}"})
    assert write.status_code == 403
    write = httpx.put(path, json=doc, headers={"authorization": f"Bearer {admin_key}"}, timeout=60)
    assert write.status_code == 200, write.text
    job = httpx.post(
        f"{orchestrator}/jobs/offline-update",
        json={"component": "reranker"},
        headers={"authorization": f"Bearer {read_key}"},
    )
    assert job.status_code == 403


def test_production_without_secret_files_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "secrets"
    empty.mkdir()
    env = stack_env(tmp_path / "data", LODESTAR_ENV="production", **{SECRETS_DIR_ENV: str(empty)})
    started = subprocess.run(
        [sys.executable, "-m", "services.index"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert "requires LODESTAR_API_KEY_HASHES" in started.stdout + started.stderr
