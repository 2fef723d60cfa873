"""The trace and feedback store, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.errors import ErrorCode, LodestarError
from shared.store import FeedbackIn, StageRun, Store, Trace, database_url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        url = database_url(None, tmp_path)
    else:
        url = request.getfixturevalue("postgres_url")
    opened = Store(url)
    request.addfinalizer(opened.close)
    return opened


def a_trace() -> Trace:
    return Trace(
        kind="search",
        request={"query": "mona lisa"},
        stages=[
            StageRun(
                stage="retrieve",
                inputs={"query": "mona lisa"},
                outputs={"hits": [{"doc_id": "Mona Lisa", "rank": 1}]},
                targets=[{"type": "doc", "id": "Mona Lisa"}, {"type": "doc", "id": "Louvre"}],
                params={"retriever": "bm25"},
                latency_ms=1.5,
            ),
            StageRun(
                stage="generate",
                inputs={},
                outputs={"answer": "Leonardo"},
                targets=[{"type": "answer", "id": "answer"}],
            ),
        ],
    )


def feedback_on(trace: Trace, **overrides: object) -> FeedbackIn:
    fields: dict[str, object] = {
        "trace_id": trace.trace_id,
        "stage": "retrieve",
        "target_type": "doc",
        "target_id": "Mona Lisa",
        "action": "relevant",
        "value": 1,
    }
    fields.update(overrides)
    return FeedbackIn(**fields)  # type: ignore[arg-type]


def test_trace_round_trip_keeps_stage_order_and_targets(store: Store) -> None:
    trace = a_trace()
    store.save_trace(trace)
    loaded = store.get_trace(trace.trace_id)
    assert loaded["kind"] == "search"
    assert [s["stage"] for s in loaded["stages"]] == ["retrieve", "generate"]
    assert loaded["stages"][0]["targets"][1] == {"type": "doc", "id": "Louvre"}
    assert loaded["stages"][0]["latency_ms"] == 1.5
    assert loaded["feedback"] == []


def test_unknown_trace_is_not_found(store: Store) -> None:
    with pytest.raises(LodestarError) as caught:
        store.get_trace("missing")
    assert caught.value.code is ErrorCode.not_found


def test_feedback_is_stored_against_a_stage_target(store: Store) -> None:
    trace = a_trace()
    store.save_trace(trace)
    feedback_id, created = store.add_feedback(
        feedback_on(trace, source="shadow", agent_id="agent-1", confidence=0.4)
    )
    assert created
    stored = store.get_trace(trace.trace_id)["feedback"]
    assert [(f["feedback_id"], f["source"], f["agent_id"], f["value"]) for f in stored] == [
        (feedback_id, "shadow", "agent-1", 1)
    ]


def test_repeated_idempotency_key_returns_the_first_id(store: Store) -> None:
    trace = a_trace()
    store.save_trace(trace)
    first, created = store.add_feedback(feedback_on(trace, idempotency_key="key-1"))
    again, created_again = store.add_feedback(
        feedback_on(trace, idempotency_key="key-1", action="irrelevant")
    )
    assert created and not created_again and again == first
    assert len(store.get_trace(trace.trace_id)["feedback"]) == 1


def test_concurrent_writers_with_one_idempotency_key_store_one_row(store: Store) -> None:
    trace = a_trace()
    store.save_trace(trace)
    ids: list[str] = []
    barrier = threading.Barrier(4)

    def write() -> None:
        barrier.wait()
        ids.append(store.add_feedback(feedback_on(trace, idempotency_key="race"))[0])

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert len(store.get_trace(trace.trace_id)["feedback"]) == 1


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"trace_id": "nope"}, ErrorCode.not_found, "trace_id"),
        ({"stage": "rerank"}, ErrorCode.not_found, "stage"),
        ({"target_id": "Not In Results"}, ErrorCode.not_found, "target_id"),
        (
            {"target_type": "answer", "target_id": "Mona Lisa", "action": "thumbs"},
            ErrorCode.not_found,
            "target_id",
        ),
        ({"action": "thumbs"}, ErrorCode.validation, "action"),
        ({"target_type": "paragraph"}, ErrorCode.validation, "target_type"),
    ],
)
def test_feedback_that_points_nowhere_is_refused(
    store: Store, overrides: dict[str, object], code: ErrorCode, field: str
) -> None:
    trace = a_trace()
    store.save_trace(trace)
    with pytest.raises(LodestarError) as caught:
        store.add_feedback(feedback_on(trace, **overrides))
    assert caught.value.code is code and caught.value.field == field
    assert store.get_trace(trace.trace_id)["feedback"] == []


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = Store(database_url(None, tmp_path))
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    store.close()


def test_jobs_are_recorded_and_unknown_jobs_are_not_found(store: Store) -> None:
    store.record_job("job-1", "lodestar.index_documents", {"collection": "wiki"})
    assert store.get_job("job-1")["params"] == {"collection": "wiki"}
    with pytest.raises(LodestarError):
        store.get_job("job-2")


def test_processes_starting_together_create_the_schema_once(tmp_path: Path) -> None:
    """Two replicas opening one fresh SQLite database at the same moment both start."""
    import subprocess
    import sys

    url = database_url(None, tmp_path)
    # Each process imports first, then opens the store at the same agreed instant.
    code = (
        "import sys, time; from shared.store import Store; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); Store(sys.argv[1]).close()"
    )
    root = Path(__file__).resolve().parents[2]
    start_at = str(time.time() + 4.0)
    starters = [
        subprocess.Popen([sys.executable, "-c", code, url, start_at], cwd=root) for _ in range(6)
    ]
    assert [p.wait(timeout=120) for p in starters] == [0] * 6
    store = Store(url)
    trace = a_trace()
    store.save_trace(trace)
    assert store.get_trace(trace.trace_id)["kind"] == "search"
    store.close()
