"""Keys and roles (docs/api.md, "Keys and roles"): read-only and admin keys, per-key rate limits,
idempotency keys scoped per key, protected docs and metrics, on the shared scaffolding every service
uses."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel

from shared.app import create_app
from shared.auth import (
    READ_POSTS,
    Principal,
    RateLimiter,
    Role,
    current_principal,
    required_role,
    scoped_idempotency_key,
)
from shared.settings import Settings, hash_api_key
from tests.conftest import make_settings

ADMIN, READER, OTHER_READER, SERVICE = "admin-key", "read-key", "read-key-2", "service-key"


class Body(BaseModel):
    text: str = "x"
    idempotency_key: str | None = None


def build(settings: Settings) -> TestClient:
    router = APIRouter()

    @router.post("/search")
    async def search(body: Body) -> dict[str, Any]:
        # What a handler sees of its caller: the key id scoping its idempotency keys.
        return {"scoped": scoped_idempotency_key(body.idempotency_key)}

    @router.get("/collections/{name}")
    async def collection(name: str) -> dict[str, str]:
        return {"name": name}

    @router.put("/collections/{name}/documents")
    async def upsert(name: str) -> dict[str, str]:
        return {"written": name}

    @router.delete("/collections/{name}/documents/{doc_id}")
    async def delete(name: str, doc_id: str) -> dict[str, str]:
        return {"deleted": doc_id}

    @router.post("/jobs/offline-update")
    async def job() -> dict[str, str]:
        return {"job_id": "j"}

    return TestClient(create_app("demo", settings, [router]))


def keyed(tmp_path: Any, **overrides: Any) -> Settings:
    return make_settings(
        tmp_path,
        api_key_hashes=[hash_api_key(ADMIN), hash_api_key(SERVICE)],
        read_api_key_hashes=[hash_api_key(READER), hash_api_key(OTHER_READER)],
        service_api_key=SERVICE,
        **overrides,
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_the_role_rule_reads_method_and_route_template() -> None:
    assert required_role("GET", "/jobs/{job_id}") is Role.read
    assert required_role("POST", "/search") is Role.read
    assert required_role("post", "/feedback") is Role.read
    assert required_role("POST", "/traces/{trace_id}/rerun") is Role.read
    for method, path in [
        ("PUT", "/collections/{name}/documents"),
        ("DELETE", "/collections/{name}/documents/{doc_id:path}"),
        ("POST", "/jobs/offline-update"),
        ("POST", "/jobs/rewrite"),
        ("POST", "/collections/{name}/build"),
        ("POST", "/collections/{name}/dsi/index"),
        ("PUT", "/users/{user_id}/profile"),
        ("POST", "/a-route-nobody-listed"),  # fail closed
    ]:
        assert required_role(method, path) is Role.admin, (method, path)
    assert "/answer" in READ_POSTS


def test_read_keys_read_and_admin_keys_write(tmp_path: Any) -> None:
    with build(keyed(tmp_path)) as client:
        assert client.post("/search", json={}).status_code == 401
        assert client.post("/search", json={}, headers=bearer("nope")).status_code == 401
        assert client.post("/search", json={}, headers=bearer(READER)).status_code == 200
        assert client.get("/collections/wiki", headers={"x-api-key": READER}).status_code == 200
        for method, path in [
            ("PUT", "/collections/wiki/documents"),
            ("DELETE", "/collections/wiki/documents/d1"),
            ("POST", "/jobs/offline-update"),
        ]:
            refused = client.request(method, path, headers=bearer(READER))
            assert refused.status_code == 403, (method, path)
            assert refused.json()["error"]["code"] == "forbidden"
            assert client.request(method, path, headers=bearer(ADMIN)).status_code == 200
        assert client.post("/search", json={}, headers=bearer(ADMIN)).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_no_keys_configured_means_no_authentication(tmp_path: Any) -> None:
    with build(make_settings(tmp_path)) as client:
        assert client.put("/collections/wiki/documents").status_code == 200
        assert client.post("/search", json={"idempotency_key": "k"}).json() == {"scoped": "k"}


def test_the_openapi_document_states_roles_and_403(tmp_path: Any) -> None:
    with build(keyed(tmp_path)) as client:
        paths = client.get("/openapi.json").json()["paths"]
    search = paths["/search"]["post"]
    upsert = paths["/collections/{name}/documents"]["put"]
    assert search["x-lodestar-role"] == "read" and "403" not in search["responses"]
    assert upsert["x-lodestar-role"] == "admin"
    assert upsert["responses"]["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


def test_each_key_has_its_own_rate_limit_and_429_says_when_to_retry(tmp_path: Any) -> None:
    settings = keyed(tmp_path, rate_limit_per_s=0.01, rate_limit_burst=3)
    with build(settings) as client:
        for _ in range(3):
            assert client.post("/search", json={}, headers=bearer(READER)).status_code == 200
        limited = client.post("/search", json={}, headers=bearer(READER))
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "overloaded"
        assert int(limited.headers["retry-after"]) >= 1
        # Another key is not slowed by the first one's bucket; the service key is never limited.
        assert client.post("/search", json={}, headers=bearer(OTHER_READER)).status_code == 200
        for _ in range(10):
            assert client.post("/search", json={}, headers=bearer(SERVICE)).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_a_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2, clock=lambda: now[0])
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("b") == 0.0  # buckets are per key
    assert RateLimiter(0.0, 0).acquire("a") == 0.0  # 0 = no limit


def test_idempotency_keys_are_scoped_to_the_callers_key(tmp_path: Any) -> None:
    with build(keyed(tmp_path)) as client:
        scoped = {
            key: client.post(
                "/search", json={"idempotency_key": "same"}, headers=bearer(key)
            ).json()["scoped"]
            for key in (READER, OTHER_READER, ADMIN)
        }
        again = client.post("/search", json={"idempotency_key": "same"}, headers=bearer(READER))
    assert len(set(scoped.values())) == 3
    assert all(value.endswith(":same") for value in scoped.values())
    assert again.json()["scoped"] == scoped[READER]
    assert current_principal.get() is None  # nothing leaks out of a request


def test_a_long_idempotency_key_still_fits_its_column() -> None:
    principal = Principal(key_id="0123456789ab", role=Role.read)
    scoped = scoped_idempotency_key("x" * 200, principal)
    assert scoped is not None and len(scoped) <= 200 and scoped.startswith("0123456789ab:")
    assert scoped != scoped_idempotency_key("y" * 200, principal)
    assert scoped_idempotency_key(None, principal) is None


def test_docs_and_metrics_can_be_protected(tmp_path: Any) -> None:
    with build(keyed(tmp_path)) as client:
        assert client.get("/metrics").status_code == 200  # open unless asked
    with build(keyed(tmp_path, protect_docs=True)) as client:
        for path in ("/metrics", "/docs", "/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
            assert client.get(path, headers=bearer(READER)).status_code == 200
        assert (
            client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        )


def test_production_refuses_a_service_key_that_is_not_an_admin_key(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="not an admin key"):
        Settings(
            env="production",
            data_dir=tmp_path,
            api_key_hashes=[hash_api_key(ADMIN)],
            read_api_key_hashes=[hash_api_key(SERVICE)],
            service_api_key=SERVICE,
        )
    Settings(
        env="production",
        data_dir=tmp_path,
        api_key_hashes=[hash_api_key(ADMIN), hash_api_key(SERVICE)],
        service_api_key=SERVICE,
    )


def test_read_key_hashes_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LODESTAR_READ_API_KEY_HASHES", f"{hash_api_key('a')},{hash_api_key('b')}")
    monkeypatch.setenv("LODESTAR_RATE_LIMIT_PER_S", "5")
    settings = Settings()
    assert settings.read_api_key_hashes == [hash_api_key("a"), hash_api_key("b")]
    assert settings.rate_limit_per_s == 5.0
    with pytest.raises(ValueError, match="SHA-256"):
        Settings(read_api_key_hashes=["plain"])


def test_keys_can_come_from_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Compose secrets and Kubernetes Secret volumes are files under /run/secrets (or
    LODESTAR_SECRETS_DIR); an environment variable of the same name wins."""
    from shared.settings import load_settings

    (tmp_path / "lodestar_service_api_key").write_text(f"{SERVICE}\n")
    (tmp_path / "lodestar_api_key_hashes").write_text(
        f"{hash_api_key(ADMIN)},{hash_api_key(SERVICE)}\n"
    )
    for name in ("SERVICE_API_KEY", "API_KEY_HASHES", "READ_API_KEY_HASHES"):
        monkeypatch.delenv(f"LODESTAR_{name}", raising=False)
    monkeypatch.setenv("LODESTAR_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("LODESTAR_READ_API_KEY_HASHES", hash_api_key(READER))
    settings = load_settings()
    assert settings.service_api_key == SERVICE
    assert settings.api_key_hashes == [hash_api_key(ADMIN), hash_api_key(SERVICE)]
    assert settings.read_api_key_hashes == [hash_api_key(READER)]
    monkeypatch.setenv("LODESTAR_SERVICE_API_KEY", "from-env")
    assert load_settings().service_api_key == "from-env"
