"""The shared service scaffolding: error model, limits, auth, deadlines, health and metrics."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel

from shared.app import Readiness, create_app, require_ready
from shared.errors import ErrorCode, LodestarError
from shared.settings import Settings, hash_api_key
from tests.conftest import make_settings


class Echo(BaseModel):
    text: str
    k: int = 1


def build(settings: Settings, warm_up=None) -> TestClient:  # type: ignore[no-untyped-def]
    router = APIRouter()
    gate = threading.Event()
    started = threading.Event()

    @router.post("/echo")
    async def echo(body: Echo) -> dict[str, object]:
        return {"text": body.text, "k": body.k}

    @router.get("/missing")
    async def missing() -> None:
        raise LodestarError(ErrorCode.not_found, "no such thing", field="id")

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @router.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(5)
        return {"done": "yes"}

    @router.get("/wait")
    async def wait() -> dict[str, str]:
        started.set()
        await asyncio.to_thread(gate.wait, 10)
        return {"waited": "yes"}

    @router.get("/needs-ready", dependencies=[__import__("fastapi").Depends(require_ready)])
    async def needs_ready() -> dict[str, str]:
        return {"ok": "yes"}

    app = create_app("demo", settings, [router], warm_up=warm_up)
    app.state.gate = gate
    app.state.started = started
    return TestClient(app)


def test_health_and_readiness_endpoints(tmp_path):
    with build(make_settings(tmp_path)) as client:
        assert client.get("/healthz").json()["status"] == "alive"
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True


def test_not_ready_service_answers_503_until_warm_up_finishes(tmp_path):
    release = threading.Event()

    def warm_up(readiness: Readiness) -> None:
        release.wait(10)
        readiness.set_ready(model="x")

    with build(make_settings(tmp_path), warm_up=warm_up) as client:
        assert client.get("/readyz").status_code == 503
        response = client.get("/needs-ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert client.get("/healthz").status_code == 200
        release.set()
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/needs-ready").status_code == 200


def test_failed_warm_up_is_reported_not_crashed(tmp_path, caplog):
    def warm_up(readiness: Readiness) -> None:
        raise OSError(f"weights missing: {tmp_path}/model.safetensors")

    with build(make_settings(tmp_path), warm_up=warm_up) as client:
        for _ in range(100):
            body = client.get("/readyz").json()
            if "failed" in body["reason"]:
                break
            threading.Event().wait(0.05)
        # The caller gets a code and a sentence; the exception text (a path here) stays in the log.
        assert body["code"] == "unavailable" and "failed" in body["reason"]
        assert "weights missing" not in body["reason"] and str(tmp_path) not in str(body)
        assert "weights missing" in caplog.text
        assert client.get("/healthz").status_code == 200


def test_validation_errors_use_the_closed_error_model(tmp_path):
    with build(make_settings(tmp_path)) as client:
        wrong_type = client.post("/echo", json={"text": 5})
        assert wrong_type.status_code == 422
        assert wrong_type.json()["error"] == {
            "code": "validation",
            "message": "Input should be a valid string",
            "field": "text",
        }
        bad_json = client.post(
            "/echo", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 422 and bad_json.json()["error"]["code"] == "validation"
        missing = client.get("/missing")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"
        no_route = client.get("/no/such/route")
        assert no_route.status_code == 404 and no_route.json()["error"]["code"] == "not_found"


def test_unexpected_exception_is_500_without_internals(tmp_path):
    with build(make_settings(tmp_path)) as client:
        client_raise = TestClient(client.app, raise_server_exceptions=False)
        response = client_raise.get("/boom")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal"
        assert "secret" not in response.text and "Traceback" not in response.text


def test_body_over_the_limit_is_413_declared_or_streamed(tmp_path):
    with build(make_settings(tmp_path, max_body_bytes=2048)) as client:
        big = {"text": "a" * 5000}
        response = client.post("/echo", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"

        def chunks():  # no content-length: the limit must hold on the bytes actually read
            for _ in range(5):
                yield b"a" * 1000

        streamed = client.post(
            "/echo", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert client.post("/echo", json={"text": "small"}).status_code == 200


def test_concurrency_limit_answers_429_immediately(tmp_path):
    with build(make_settings(tmp_path, max_concurrency=1)) as client:
        gate: threading.Event = client.app.state.gate
        results: list[int] = []
        holder = threading.Thread(target=lambda: results.append(client.get("/wait").status_code))
        holder.start()
        assert client.app.state.started.wait(10)  # the first request is in flight
        response = client.get("/missing")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
        assert client.get("/healthz").status_code == 200  # health is never throttled
        gate.set()
        holder.join(10)
        assert results == [200]


def test_request_past_its_deadline_gets_504(tmp_path):
    with build(make_settings(tmp_path, request_timeout_s=0.3)) as client:
        response = client.get("/slow")
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_api_keys_are_checked_against_stored_hashes(tmp_path):
    settings = make_settings(tmp_path, api_key_hashes=[hash_api_key("s3cret")])
    with build(settings) as client:
        assert client.post("/echo", json={"text": "x"}).status_code == 401
        wrong = client.post("/echo", json={"text": "x"}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        ok = client.post("/echo", json={"text": "x"}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (
            client.post("/echo", json={"text": "x"}, headers={"x-api-key": "s3cret"}).status_code
            == 200
        )
        assert client.get("/healthz").status_code == 200  # probes need no key


def test_timing_headers_and_prometheus_metrics(tmp_path):
    with build(make_settings(tmp_path)) as client:
        response = client.post("/echo", json={"text": "x"})
        assert float(response.headers["x-lodestar-time-ms"]) >= 0
        assert response.headers["server-timing"].startswith("app;dur=")
        assert response.headers["x-request-id"]
        client.post("/echo", json={"text": 1})
        metrics = client.get("/metrics").text
        assert 'demo_request_success_total{method="POST",route="/echo"} 1.0' in metrics
        assert 'demo_request_failure_total{method="POST",route="/echo",status="422"} 1.0' in metrics


def test_production_refuses_to_start_without_api_keys(tmp_path):
    with pytest.raises(ValueError, match="requires LODESTAR_API_KEY_HASHES"):
        Settings(env="production", data_dir=tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        Settings(api_key_hashes=["plaintext-key"])
    Settings(env="production", api_key_hashes=[hash_api_key("k")])


def test_settings_read_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LODESTAR_MAX_K", "50")
    monkeypatch.setenv("LODESTAR_API_KEY_HASHES", f"{hash_api_key('a')}, {hash_api_key('b')}")
    monkeypatch.setenv("LODESTAR_INDEX_PORT", "9101")
    settings = Settings()
    assert settings.max_k == 50
    assert settings.api_key_hashes == [hash_api_key("a"), hash_api_key("b")]
    assert settings.port_of("index") == 9101
    with pytest.raises(KeyError):
        settings.port_of("nope")
