"""Concurrent queries share encode calls; each caller gets its own query's vector."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from services.index.batching import QueryBatcher


def vector_of(text: str) -> np.ndarray:
    return np.array([float(len(text)), float(sum(map(ord, text)))], dtype=np.float32)


class GatedEncode:
    """Encodes as ``vector_of``; the first call waits until released, so others queue."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        return np.stack([vector_of(t) for t in texts])


def test_one_query_alone_is_encoded_at_once() -> None:
    encode = GatedEncode()
    encode.release.set()
    batcher = QueryBatcher(encode, slots=1)
    assert np.array_equal(batcher.encode("alone"), vector_of("alone"))
    assert encode.batches == [["alone"]]


def test_queries_arriving_while_the_slot_is_busy_share_the_next_batch() -> None:
    encode = GatedEncode()
    batcher = QueryBatcher(encode, slots=1, max_batch=16)
    queries = [f"query number {i}" for i in range(6)]
    with ThreadPoolExecutor(len(queries)) as pool:
        first = pool.submit(batcher.encode, queries[0])
        assert encode.first_started.wait(10)
        rest = [pool.submit(batcher.encode, q) for q in queries[1:]]
        while len(batcher._pending) < len(rest):  # all queued behind the busy slot
            threading.Event().wait(0.01)
        encode.release.set()
        results = [first.result(10)] + [f.result(10) for f in rest]
    for query, vector in zip(queries, results, strict=True):
        assert np.array_equal(vector, vector_of(query))
    assert encode.batches[0] == [queries[0]]
    assert sorted(encode.batches[1]) == sorted(queries[1:])
    assert batcher.batches == 2 and batcher.queries == 6


def test_max_batch_splits_a_long_queue() -> None:
    encode = GatedEncode()
    batcher = QueryBatcher(encode, slots=1, max_batch=2)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.encode, "q0")
        assert encode.first_started.wait(10)
        rest = [pool.submit(batcher.encode, f"q{i}") for i in range(1, 6)]
        while len(batcher._pending) < 5:
            threading.Event().wait(0.01)
        encode.release.set()
        assert np.array_equal(first.result(10), vector_of("q0"))
        for i, future in enumerate(rest, 1):
            assert np.array_equal(future.result(10), vector_of(f"q{i}"))
    assert [len(b) for b in encode.batches] == [1, 2, 2, 1]


def test_an_encode_error_reaches_every_caller_of_the_batch_and_the_next_batch_runs() -> None:
    calls: list[list[str]] = []

    def failing_once(texts: Sequence[str]) -> np.ndarray:
        calls.append(list(texts))
        if len(calls) == 1:
            raise RuntimeError("encoder fell over")
        return np.stack([vector_of(t) for t in texts])

    batcher = QueryBatcher(failing_once, slots=1)
    with pytest.raises(RuntimeError, match="fell over"):
        batcher.encode("first")
    assert np.array_equal(batcher.encode("second"), vector_of("second"))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        QueryBatcher(vector_of, slots=0)  # type: ignore[arg-type]


class CallGates:
    """Encodes as ``vector_of``; call i waits for ``release[i]``."""

    def __init__(self, calls: int) -> None:
        self.started = [threading.Event() for _ in range(calls)]
        self.release = [threading.Event() for _ in range(calls)]
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            i = len(self.batches)
            self.batches.append(list(texts))
        self.started[i].set()
        assert self.release[i].wait(10)
        return np.stack([vector_of(t) for t in texts])


class CountingBatcher(QueryBatcher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs: list[int] = []

    def _run(self, batch: list[Any]) -> None:
        self.runs.append(len(batch))
        super()._run(batch)


def test_a_caller_whose_query_another_batch_holds_waits_instead_of_taking_a_slot() -> None:
    """Both slots busy, c and d queue; when a slot frees, c's caller encodes [c, d]; when the
    second slot frees, d's caller must wait for that batch, not run empty ones meanwhile."""
    encode = CallGates(3)
    batcher = CountingBatcher(encode, slots=2, max_batch=16)
    with ThreadPoolExecutor(4) as pool:
        a = pool.submit(batcher.encode, "a")
        assert encode.started[0].wait(10)
        b = pool.submit(batcher.encode, "b")
        assert encode.started[1].wait(10)
        c = pool.submit(batcher.encode, "c")
        d = pool.submit(batcher.encode, "d")
        while len(batcher._pending) < 2:
            threading.Event().wait(0.01)
        encode.release[0].set()  # a done: one slot frees, [c, d] starts
        assert encode.started[2].wait(10)
        encode.release[1].set()  # b done: a slot is free and nothing is queued
        assert b.result(10) is not None
        threading.Event().wait(0.2)  # time for a spinning caller to run empty batches
        encode.release[2].set()
        results = [f.result(10) for f in (a, b, c, d)]
    for query, vector in zip("abcd", results, strict=True):
        assert np.array_equal(vector, vector_of(query))
    assert sorted(encode.batches[2]) == ["c", "d"]
    assert batcher.runs == [1, 1, 2]
