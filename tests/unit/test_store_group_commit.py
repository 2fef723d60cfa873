"""Group-committed trace writes (docs/search-performance.md): concurrent ``save_trace`` calls share
one transaction, each returns only once its trace is committed (feedback may name it at once), and a
bad trace in a group fails only its own caller."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from shared.store import Store, Trace, _PendingTrace, database_url
from tests.unit.test_store import a_trace, feedback_on

WRITERS = 8


class HeldStore(Store):
    """With ``hold_for`` set, the next trace commit waits until that many other traces have
    queued behind it, so the test does not depend on thread timing to see a group."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.hold_for: int | None = None
        self.batches: list[int] = []

    def _commit_traces(self, batch: list[_PendingTrace]) -> None:
        if self.hold_for is not None:
            deadline = time.monotonic() + 30
            while len(self._trace_queue) < self.hold_for and time.monotonic() < deadline:
                time.sleep(0.005)
            self.hold_for = None
        self.batches.append(len(batch))
        super()._commit_traces(batch)


def run_writers(store: Store, traces: list[Trace]) -> dict[int, Exception | None]:
    """Each trace saved on its own thread, then feedback on it at once; the outcome by index."""
    outcomes: dict[int, Exception | None] = {}

    def write(i: int) -> None:
        try:
            store.save_trace(traces[i])
            store.add_feedback(feedback_on(traces[i]))
            outcomes[i] = None
        except Exception as exc:  # the test reads it
            outcomes[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(traces))]
    threads[0].start()  # the first holds the commit the others queue behind
    time.sleep(0.05)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_concurrent_traces_share_one_commit_and_accept_feedback_on_return(
    tmp_path: Path,
) -> None:
    store = HeldStore(database_url(None, tmp_path))
    store.hold_for = WRITERS - 1
    traces = [a_trace() for _ in range(WRITERS)]
    outcomes = run_writers(store, traces)
    assert outcomes == {i: None for i in range(WRITERS)}
    # The first commit was its own trace; the seven that queued meanwhile shared the second.
    assert store.batches == [1, WRITERS - 1]
    assert store.trace_commits == 2
    for trace in traces:
        stored = store.get_trace(trace.trace_id)
        assert [s["stage"] for s in stored["stages"]] == ["retrieve", "generate"]
        assert len(stored["feedback"]) == 1
    store.close()


def test_a_bad_trace_in_a_group_fails_only_its_caller(tmp_path: Path) -> None:
    store = HeldStore(database_url(None, tmp_path))
    first = a_trace()
    store.save_trace(first)
    store.batches.clear()
    store.hold_for = 3  # the next commit waits for the group of three
    good = [a_trace(), a_trace()]
    duplicate = Trace(kind="search", request={}, trace_id=first.trace_id)
    leader = a_trace()
    outcomes = run_writers(store, [leader, good[0], duplicate, good[1]])
    assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
    assert isinstance(outcomes[2], IntegrityError)
    assert store.batches == [1, 3]  # the group of three failed whole, then went one by one
    for trace in [leader, *good]:
        assert store.get_trace(trace.trace_id)["trace_id"] == trace.trace_id
    store.close()


def test_one_writer_commits_at_once(tmp_path: Path) -> None:
    store = Store(database_url(None, tmp_path))
    for _ in range(3):
        store.save_trace(a_trace())
    assert store.trace_commits == 3
    trace = a_trace()
    store.save_trace(trace)
    with pytest.raises(IntegrityError):  # alone, a bad trace's error is its caller's
        store.save_trace(trace)
    store.save_trace(a_trace())  # and the next write is not stuck behind it
    assert store.trace_commits == 5
    store.close()
