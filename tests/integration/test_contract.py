"""Schemathesis against each service's own OpenAPI document, in-process through its ASGI app
(docs/api.md, "The contract test"): every response a generated request gets must be documented
(status, schema, content type, headers), schema-valid requests accepted, schema-invalid ones
rejected with a 4xx, unsupported methods answered 405 with ``Allow``; no 500 ever.

Real engines on real (small) models; budgets keep the module to a few minutes on two cores:
few examples per operation, a short request deadline (a generation cut by it still answers 200),
``/answer`` with 8 new tokens, and no ``/shadow/simulate`` (one LLM pass per document judged).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.python import asgi

from shared.schemas import Document
from shared.settings import Settings
from tests.conftest import make_settings

#: Hypothesis examples per operation in the fuzzing phase (examples and coverage phases add
#: their own, bounded by the schema).
MAX_EXAMPLES = 4
#: 503 (a model not trained yet, a broker down) and 504 (the request deadline) are designed,
#: documented answers; 500 stays a failure.
SERVER_STATUSES_ALLOWED = ["2xx", "3xx", "4xx", "503", "504"]
#: A text or list over its limit is refused with 413 ``too_large`` (docs/api.md, "Errors"), a
#: rejection as good as a 422; the check's default list lacks it.
REJECTION_STATUSES = [
    "400",
    "401",
    "403",
    "404",
    "405",
    "406",
    "409",
    "413",
    "415",
    "422",
    "428",
    "429",
    "5xx",
]


#: A valid request may still meet a downstream that is down (the orchestrator's fm and dsi
#: retrievers are not running in its run): 424 ``dependency_failed`` says so, like a 5xx.
ACCEPTANCE_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "424", "429", "5xx"]


def _wait_ready(app: FastAPI, timeout_s: float = 900) -> None:
    """Wait for warm-up, so generated requests meet a ready service."""
    client = asgi.get_client(app)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        if response.json()["reason"] != "starting":  # warm-up failed: the log says why
            break
        time.sleep(0.2)
    raise AssertionError(f"{app.title} did not become ready: {client.get('/readyz').text}")


def _schema(app: FastAPI, *, exclude_paths: tuple[str, ...] = ()) -> Any:
    # Loading the document starts the app's lifespan (schemathesis keeps one per app for the
    # process); a plain client request does not, so wait for warm-up only after it.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    _wait_ready(app)
    for path in exclude_paths:
        schema = schema.exclude(path=path)
    schema.config.generation.update(max_examples=MAX_EXAMPLES)
    schema.config.checks.not_a_server_error.expected_statuses = SERVER_STATUSES_ALLOWED
    schema.config.checks.negative_data_rejection.expected_statuses = REJECTION_STATUSES
    schema.config.checks.positive_data_acceptance.expected_statuses = ACCEPTANCE_STATUSES
    _accept_stated_rules(schema)
    return schema


def stated_rules(document: dict[str, Any]) -> dict[str, set[str]]:
    """``"<METHOD> <path>"`` -> the fields of the rules its 422 states (``x-lodestar-rules``,
    written by ``shared.errors.error_responses(rules=...)``)."""
    rules: dict[str, set[str]] = {}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict):
                continue
            stated = operation.get("responses", {}).get("422", {}).get("x-lodestar-rules")
            if stated:
                rules[f"{method.upper()} {path}"] = set(stated)
    return rules


#: Refusals by stated rules accepted in the current run, by "<operation> <field>".
ACCEPTED: Counter[str] = Counter()


def _accept_stated_rules(schema: Any) -> None:
    """The one adjustment to ``positive_data_acceptance``: a schema-valid request refused with
    422 ``validation`` whose ``field`` is one of its operation's stated rules met a rule JSON
    Schema cannot express (a cross-field rule, or one against the state of what the request
    names: a trace's stages, a collection's dimension), and the document says so. Only that
    operation, that status, that code and those fields; every other refusal stays a failure.
    Each accepted refusal is still counted (``run_schemathesis``)."""
    from schemathesis.openapi.checks import RejectedPositiveData

    rules = stated_rules(schema.raw_schema)

    def filter_failure(ctx: Any, failure: Any, case: Any, response: Any) -> bool:
        fields = rules.get(case.operation.label)
        if not fields or not isinstance(failure, RejectedPositiveData):
            return True
        if response.status_code != 422:
            return True
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return True
        if error.get("code") == "validation" and error.get("field") in fields:
            ACCEPTED[f"{case.operation.label} {error['field']}"] += 1
            return False
        return True

    schema.hook("filter_failure")(filter_failure)


def _settings(data_dir: Path, **overrides: Any) -> Settings:
    # A short deadline bounds every generation a generated request can ask for.
    return make_settings(data_dir, request_timeout_s=5, **overrides)


def _service(build: Callable[[Settings], FastAPI], settings: Settings, **kw: Any) -> Any:
    return _schema(build(settings), **kw)


@pytest.fixture(scope="module")
def index_schema(wiki_sample: list[Document], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services.index.app import build_app
    from services.index.engine import IndexEngine
    from shared.models import get_embedder

    # A small real collection of its own: generated upserts and deletes change it.
    settings = _settings(tmp_path_factory.mktemp("contract-index"))
    IndexEngine(settings.data_dir, lambda: get_embedder(settings)).upsert("wiki", wiki_sample[:8])
    return _service(build_app, settings)


def _model_service(name: str) -> Any:
    """A module fixture: the ``name`` service built by its own ``build_app`` on an empty data
    directory (its models come from the shared models folder)."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Any:
        import importlib

        build_app = importlib.import_module(f"services.{name}.app").build_app
        return _service(build_app, _settings(tmp_path_factory.mktemp(f"contract-{name}")))

    return fixture


@pytest.fixture(scope="module")
def fmindex_schema(wiki_sample: list[Document], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from services.fmindex.app import build_app
    from services.fmindex.corpus import CollectionStore
    from services.fmindex.engine import FmSettings
    from shared.models import LLM_ID, llm_dir

    settings = _settings(tmp_path_factory.mktemp("contract-fmindex"))
    tokenizer = AutoTokenizer.from_pretrained(llm_dir(settings))
    # A real FM-index over 8 documents; small beams keep each generated search short.
    CollectionStore(settings.data_dir / "fmindex").build(
        "wiki", wiki_sample[:8], tokenizer, tokenizer_id=LLM_ID
    )
    fm = FmSettings(beam=2, length=4, title_length=6, generator="base", threads=1)
    return _schema(build_app(settings, fm))


@pytest.fixture(scope="module")
def dsi_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services.dsi.app import build_app

    return _service(build_app, _settings(tmp_path_factory.mktemp("contract-dsi")))


@pytest.fixture(scope="module")
def orchestrator_schema(
    built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The orchestrator in-process, over a real index process on a copy of the small ``wiki``
    collection (generated writes change it). No worker: jobs are queued, not run."""
    import shutil

    from services.orchestrator.app import build_app
    from tests.conftest import free_port, spawn, stack_env, wait_ready

    data_dir = tmp_path_factory.mktemp("contract-orchestrator") / "data"
    shutil.copytree(built_data_dir, data_dir)
    port = free_port()
    index = spawn(
        "index",
        ["-m", "services.index"],
        stack_env(data_dir, LODESTAR_INDEX_PORT=str(port)),
        tmp_path_factory.mktemp("contract-orchestrator-logs"),
    )
    try:
        # Warm-up on a loaded two-core machine can take minutes (the embedder, the ONNX encoder).
        wait_ready(f"http://127.0.0.1:{port}", index, timeout_s=900)
        settings = _settings(
            data_dir, index_url=f"http://127.0.0.1:{port}", answer_max_new_tokens=8
        )
        yield _schema(build_app(settings), exclude_paths=ORCHESTRATOR_EXCLUDED)
    finally:
        index.stop()


#: Orchestrator operations left out of the run: a shadow simulation runs the LLM once per
#: document judged (up to 50). ``/answer`` is in, with 8 new tokens and a 5 s deadline.
ORCHESTRATOR_EXCLUDED = ("/shadow/simulate",)

critic_schema = _model_service("critic")
reranker_schema = _model_service("reranker")
rewriter_schema = _model_service("rewriter")
generator_schema = _model_service("generator")


def run_schemathesis(schema: Any) -> tuple[int, list[str], int]:
    """Run every phase over the document with schemathesis' own engine (what ``st run`` runs):
    the number of requests sent, one line per distinct failure or error (with the request and
    the answer of its first occurrence, so a log says what to fix), and how many refusals by
    stated rules were accepted (``_accept_stated_rules``)."""
    from schemathesis.engine import Status, events, from_schema

    requests, accepted = 0, 0
    ACCEPTED.clear()
    failures: dict[str, str] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            requests += len(recorder.cases)
            accepted += sum(recorder.filtered_failures.values())
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status != Status.FAILURE or check.failure_info is None:
                        continue
                    detail = " ".join(check.failure_info.failure.message.split())[:160]
                    key = f"{recorder.label}: {check.name}: {detail}"
                    failures.setdefault(key, _example(recorder.interactions.get(case_id)))
        elif isinstance(event, events.NonFatalError):
            failures.setdefault(f"{event.label}: error: {event.value!r}", "")
        elif isinstance(event, events.FatalError):
            failures.setdefault(f"fatal: {event.exception!r}", "")
    return requests, [f"{k}\n    {v}" if v else k for k, v in sorted(failures.items())], accepted


def _example(interaction: Any) -> str:
    """One failing exchange, short: method, URL, body; status, body, ``Allow``."""
    if interaction is None:
        return ""
    request, response = interaction.request, interaction.response
    sent = f"{request.method} {request.uri} {(request.body or b'')[:200]!r}"
    if response is None:
        return f"{sent} -> no response"
    allow = response.headers.get("allow")
    return f"{sent} -> {response.status_code} {response.content[:200]!r}" + (
        f" Allow: {allow}" if allow else ""
    )


def _check(schema: Any, service: str) -> None:
    """No failure of any kind (the known-failure ratchets of docs/api.md are empty and gone: a
    rule the schema cannot state is stated in its route's 422 instead, ``_accept_stated_rules``)."""
    requests, failures, accepted = run_schemathesis(schema)
    print(
        f"schemathesis {service}: {requests} requests, {len(failures)} failures"
        f" ({accepted} refusals by stated rules accepted"
        + "".join(f"; {rule}: {n}" for rule, n in sorted(ACCEPTED.items()))
        + ")"
    )
    for failure in failures:
        print(f"  {failure}")
    assert requests > 0
    assert failures == [], "\n".join(failures)


def test_index_contract(index_schema: Any) -> None:
    _check(index_schema, "index")


def test_critic_contract(critic_schema: Any) -> None:
    _check(critic_schema, "critic")


def test_reranker_contract(reranker_schema: Any) -> None:
    _check(reranker_schema, "reranker")


def test_rewriter_contract(rewriter_schema: Any) -> None:
    _check(rewriter_schema, "rewriter")


def test_generator_contract(generator_schema: Any) -> None:
    _check(generator_schema, "generator")


def test_fmindex_contract(fmindex_schema: Any) -> None:
    _check(fmindex_schema, "fmindex")


def test_dsi_contract(dsi_schema: Any) -> None:
    _check(dsi_schema, "dsi")


def test_orchestrator_contract(orchestrator_schema: Any) -> None:
    _check(orchestrator_schema, "orchestrator")
