"""``lodestar bench soak``: mixed load over time, services killed under it, crash cycles.

Three phases on a stack of real service processes started for the run (its own data directory
and store; the models folder is shared), one report JSON:

1. **Soak.** The load mix (``/search``, ``/answer``, ``/feedback``, document upserts and deletes
   through the orchestrator) is first run closed-loop for ``--peak-s`` seconds to measure its
   peak rate on this machine; then open-loop at ``--fraction`` of that peak for ``--duration``
   seconds. Every answer is classified; the report gives counts per operation and outcome,
   unexpected errors (any 5xx, any connection error, any status the operation never answers
   when healthy), latency percentiles, and each process's RSS at the start and end of the
   phase (growth in %; the first ``--warmup-s`` seconds are excluded, first-touch allocations).
2. **Faults.** Under the same load, each service in turn is killed (SIGKILL), left down for
   ``--down-s`` seconds, restarted and waited for. While it is down its callers must answer
   with ``degraded`` or a typed error (424 ``dependency_failed``, 503, 504; a connection error
   only when the orchestrator itself is the one down), never a 500; after it is back, a request
   that needs it must succeed again (``recovered`` and the seconds it took).
3. **Crash cycles.** ``--crash-cycles`` times: feedback bursts on a fresh trace from several
   threads, the orchestrator killed with SIGKILL in the middle, restarted; then every feedback
   acknowledged with 201 must be in the trace, and replaying its idempotency key must return the
   same id with ``created: false``. The count of acknowledged feedback lost is the figure.

The command is heavy (several model processes); run it niced on a shared machine. The test suite
runs a bounded version (``tests/integration/test_soak.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lodestar.bench.common import kill_group, stop_group, write_results
from lodestar.stack import SINGLE_THREADED
from shared.errors import ErrorCode
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "soak.json"

#: The services a soak can run, in start order (the orchestrator last: it needs the others).
MODULES = {
    "index": "services.index",
    "reranker": "services.reranker",
    "critic": "services.critic",
    "generator": "services.generator",
    "orchestrator": "services.orchestrator",
}
DEFAULT_SERVICES = ("index", "reranker", "critic", "generator", "orchestrator")
#: The load mix: operation -> weight.
MIX = {"search": 0.55, "search_rerank": 0.1, "answer": 0.05, "feedback": 0.2, "upsert": 0.05,
       "delete": 0.05}  # fmt: skip
#: What each operation answers when every service is up.
HEALTHY_STATUS = {
    "search": 200,
    "search_rerank": 200,
    "answer": 200,
    "feedback": 201,
    "upsert": 200,
    "delete": 200,
}
#: Typed answers a caller may give while a service it needs is down.
TYPED_WHILE_DOWN = {
    ErrorCode.dependency_failed.value,
    ErrorCode.unavailable.value,
    ErrorCode.timeout.value,
}
COLLECTION = "soak"


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    port: int
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", MODULES[self.name]],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.starts += 1

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log}")

    def kill9(self) -> None:
        if self.popen is not None:
            kill_group(self.popen)

    def stop(self) -> None:
        if self.popen is not None:
            stop_group(self.popen)

    def rss_bytes(self) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return None
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    """The soak's processes: one data directory and store of its own, ports picked free."""

    def __init__(
        self,
        services: tuple[str, ...],
        work: Path,
        models_dir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        if "orchestrator" not in services or "index" not in services:
            raise ValueError("a soak needs at least the index and the orchestrator")
        self.work = work
        ports = {name: free_port() for name in services}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_")}
        env.update(
            LODESTAR_DATA_DIR=str(work / "data"),
            LODESTAR_MODELS_DIR=str(models_dir),
            LODESTAR_LOG_JSON="false",
            LODESTAR_ANSWER_MAX_NEW_TOKENS="16",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(SINGLE_THREADED)
        for name, port in ports.items():
            env[f"LODESTAR_{name.upper()}_PORT"] = str(port)
            if name != "orchestrator":
                env[f"LODESTAR_{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        for name in ("reranker", "critic"):  # not running: their callers degrade at once
            env.setdefault(f"LODESTAR_{name.upper()}_URL", "http://127.0.0.1:9")
        env.update(extra_env or {})
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.services = {
            name: Service(name, port, env, logs / f"{name}.log") for name, port in ports.items()
        }
        self.orchestrator = self.services["orchestrator"]

    def start(self) -> dict[str, float]:
        ready_s: dict[str, float] = {}
        for name in [n for n in MODULES if n in self.services]:
            self.services[name].start()
        for name in [n for n in MODULES if n in self.services]:
            ready_s[name] = round(self.services[name].wait_ready(), 1)
        return ready_s

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.stop()

    def rss(self) -> dict[str, int | None]:
        return {name: service.rss_bytes() for name, service in self.services.items()}


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    op: str
    status: int | None  # None: no HTTP answer (connection refused, reset, timed out)
    code: str | None = None
    degraded: tuple[str, ...] = ()
    error: str | None = None
    ms: float = 0.0
    phase: str = ""


@dataclass
class Recorder:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    phase: str = "warmup"

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            outcome.phase = self.phase
            self.outcomes.append(outcome)

    def of(self, phase: str) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.phase == phase]


class Workload:
    """One operation of the mix at a time; traces and written documents are remembered so
    feedback and deletes have real targets."""

    def __init__(self, base_url: str, corpus: list[dict[str, Any]], queries: list[str]) -> None:
        self.base_url = base_url
        self.corpus = corpus
        self.queries = queries
        self.traces: deque[tuple[str, list[str]]] = deque(maxlen=200)
        self.written: deque[str] = deque()
        self.counter = 0
        self.lock = threading.Lock()
        self.local = threading.local()

    def http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(base_url=self.base_url, timeout=120)
        return client  # type: ignore[no-any-return]

    def _next(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter

    def run(self, op: str) -> Outcome:
        started = time.perf_counter()
        try:
            response = self._send(op)
        except httpx.HTTPError as exc:
            return Outcome(op, None, error=type(exc).__name__, ms=_ms(started))
        if response is None:  # nothing to do yet (no trace to give feedback on, say)
            return Outcome(op, 0, ms=_ms(started))
        outcome = Outcome(op, response.status_code, ms=_ms(started))
        try:
            body = response.json()
        except ValueError:
            outcome.error = "not JSON"
            return outcome
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            outcome.code = error.get("code") if isinstance(error, dict) else None
            if outcome.code is None:
                outcome.error = "untyped error body"
        elif isinstance(body, dict):
            outcome.degraded = tuple(body.get("degraded") or ())
            self._remember(op, body)
        return outcome

    def _send(self, op: str) -> httpx.Response | None:
        n = self._next()
        http = self.http()
        query = self.queries[n % len(self.queries)]
        if op in ("search", "search_rerank"):
            body: dict[str, Any] = {"query": query, "collection": COLLECTION, "k": 10}
            if op == "search_rerank":
                body["rerank"] = "cosine"
            return http.post("/search", json=body)
        if op == "answer":
            # No max_rounds: the critic is asked (an untrained one answers 503: one round).
            return http.post("/answer", json={"question": query, "collection": COLLECTION})
        if op == "feedback":
            with self.lock:
                if not self.traces:
                    return None
                trace_id, hits = self.traces[n % len(self.traces)]
            return http.post(
                "/feedback",
                json={
                    "trace_id": trace_id,
                    "stage": "fusion",
                    "target_type": "doc",
                    "target_id": hits[n % len(hits)],
                    "action": "relevant" if n % 2 else "irrelevant",
                    "idempotency_key": f"soak-{n}",
                },
            )
        if op == "upsert":
            source = self.corpus[n % len(self.corpus)]
            doc = {**source, "id": f"soak-new-{n}"}
            self.local.pending = doc["id"]
            return http.put(f"/collections/{COLLECTION}/documents", json={"documents": [doc]})
        if op == "delete":
            with self.lock:
                if not self.written:
                    return None
                doc_id = self.written.popleft()
            return http.delete(f"/collections/{COLLECTION}/documents/{doc_id}")
        raise ValueError(op)

    def _remember(self, op: str, body: dict[str, Any]) -> None:
        with self.lock:
            if op in ("search", "search_rerank") and body.get("hits"):
                self.traces.append((body["trace_id"], [h["doc_id"] for h in body["hits"]]))
            elif op == "upsert" and body.get("upserted"):
                self.written.append(self.local.pending)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _ops(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    while True:
        yield rng.choices(names, weights)[0]


def closed_loop(workload: Workload, recorder: Recorder, clients: int, seconds: float) -> float:
    """Each client sends the next operation as soon as the last one answered: the peak rate
    (operations a second) of the mix on this machine."""
    stop = time.monotonic() + seconds
    done = Counter[int]()

    def client(index: int) -> None:
        for op in _ops(1000 + index):
            if time.monotonic() >= stop:
                return
            recorder.add(workload.run(op))
            done[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done.values()) / max(1e-9, time.monotonic() - started)


class OpenLoop:
    """Operations started at a fixed rate whatever the answers' latency (what users do), on a
    bounded pool; starts that found every worker busy are counted as ``late``."""

    def __init__(self, workload: Workload, recorder: Recorder, rate: float, workers: int) -> None:
        self.workload, self.recorder, self.rate = workload, recorder, rate
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soak")
        self.busy = threading.Semaphore(workers)
        self.late = 0
        self.started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._schedule, daemon=True)

    def __enter__(self) -> OpenLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.pool.shutdown(wait=True)

    def _schedule(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        for op in _ops(7):
            if self._stop.is_set():
                return
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            next_at += interval
            if not self.busy.acquire(blocking=False):
                self.late += 1
                self.busy.acquire()
            self.started += 1
            self.pool.submit(self._one, op)

    def _one(self, op: str) -> None:
        try:
            self.recorder.add(self.workload.run(op))
        finally:
            self.busy.release()


# --- classification ----------------------------------------------------------------------------


def healthy_unexpected(outcome: Outcome) -> bool:
    """With every service up, anything but the operation's own success is unexpected."""
    if outcome.status == 0:  # skipped: nothing to act on yet
        return False
    return outcome.status != HEALTHY_STATUS[outcome.op] or outcome.error is not None


def while_down_unexpected(outcome: Outcome, down: str) -> bool:
    """While ``down`` is down: success (degraded or not) or a typed 424/503/504 is fine; a 500,
    an untyped body, or a dropped connection (unless the orchestrator itself is down) is not.
    A 4xx that describes the request (a trace, say, that the index's outage kept from being
    written) is the operation's normal answer to it."""
    if outcome.status == 0:
        return False
    if outcome.status is None:
        return down != "orchestrator"
    if outcome.error is not None or (
        outcome.status >= 500 and outcome.code not in TYPED_WHILE_DOWN
    ):
        return True
    if outcome.status >= 400:
        return outcome.code is None
    return False


def summarize(outcomes: list[Outcome], unexpected: Callable[[Outcome], bool]) -> dict[str, Any]:
    by_op: dict[str, Counter[str]] = {}
    latency: dict[str, list[float]] = {}
    bad: Counter[str] = Counter()
    for o in outcomes:
        if o.status == 0:
            continue
        label = (
            f"{o.status}"
            + (f" {o.code}" if o.code else "")
            + (" degraded" if o.degraded else "")
            + (f" {o.error}" if o.error else "")
        )
        by_op.setdefault(o.op, Counter())[label] += 1
        if o.status is not None and o.status < 400:
            latency.setdefault(o.op, []).append(o.ms)
        if unexpected(o):
            bad[f"{o.op}: {label}"] += 1
    return {
        "requests": sum(sum(c.values()) for c in by_op.values()),
        "by_operation": {op: dict(c) for op, c in sorted(by_op.items())},
        "server_errors_500": sum(1 for o in outcomes if o.status == 500),
        "unexpected": sum(bad.values()),
        "unexpected_kinds": dict(bad),
        "latency_ms": {
            op: {f"p{q}": round(float(np.percentile(v, q)), 1) for q in (50, 95)}
            for op, v in sorted(latency.items())
        },
    }


# --- phases ------------------------------------------------------------------------------------


def seed_collection(base_url: str, corpus: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=base_url, timeout=600) as http:
        for start in range(0, len(corpus), 50):
            batch = corpus[start : start + 50]
            response = http.put(f"/collections/{COLLECTION}/documents", json={"documents": batch})
            response.raise_for_status()


@contextmanager
def rss_sampler(stack: Stack, every_s: float) -> Iterator[list[dict[str, Any]]]:
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            samples.append({"t": time.monotonic(), **stack.rss()})
            stop.wait(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append({"t": time.monotonic(), **stack.rss()})


def rss_growth(samples: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        values = [s[name] for s in samples if s.get(name)]
        if len(values) < 2:
            continue
        first, last = values[0], values[-1]
        out[name] = {
            "start_mb": round(first / 2**20, 1),
            "end_mb": round(last / 2**20, 1),
            "max_mb": round(max(values) / 2**20, 1),
            "growth_pct": round(100 * (last - first) / first, 2),
        }
    return out


def soak_phase(
    stack: Stack, workload: Workload, recorder: Recorder, args: argparse.Namespace
) -> dict[str, Any]:
    recorder.phase = "peak"
    peak = closed_loop(workload, recorder, args.clients, args.peak_s)
    rate = max(0.2, peak * args.fraction)
    with OpenLoop(workload, recorder, rate, args.workers) as load:
        recorder.phase = "warmup"
        time.sleep(args.warmup_s)
        recorder.phase = "soak"
        with rss_sampler(stack, args.rss_every_s) as samples:
            time.sleep(args.duration)
        late = load.late
    return {
        "peak_ops_per_s": round(peak, 2),
        "peak_clients": args.clients,
        "fraction": args.fraction,
        "rate_ops_per_s": round(rate, 2),
        "duration_s": args.duration,
        "late_starts": late,
        "peak_run": summarize(recorder.of("peak"), healthy_unexpected),
        **summarize(recorder.of("soak"), healthy_unexpected),
        "rss": rss_growth(samples, list(stack.services)),
    }


#: A request that needs each service (through the orchestrator).
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "index": ("/search", {"query": "history", "collection": COLLECTION, "k": 3}),
    "orchestrator": ("/search", {"query": "history", "collection": COLLECTION, "k": 3}),
    "reranker": (
        "/search",
        {"query": "history", "collection": COLLECTION, "k": 3, "rerank": "cosine"},
    ),
    # No max_rounds: the critic decides when to stop, so the answer needs it (degraded without).
    "critic": ("/answer", {"question": "history", "collection": COLLECTION}),
    "generator": (
        "/answer",
        {"question": "history", "collection": COLLECTION, "max_rounds": 1},
    ),
}


def probe(stack: Stack, name: str) -> dict[str, Any]:
    """What the request that needs ``name`` answers now: status, code, degraded."""
    path, body = PROBES[name]
    try:
        response = httpx.post(f"{stack.orchestrator.url}{path}", json=body, timeout=120)
    except httpx.HTTPError as exc:
        return {"status": None, "error": type(exc).__name__}
    payload = response.json()
    error = payload.get("error") if isinstance(payload, dict) else None
    return {
        "status": response.status_code,
        "code": error.get("code") if isinstance(error, dict) else None,
        "degraded": payload.get("degraded") if isinstance(payload, dict) else None,
    }


def _recovered(stack: Stack, name: str, timeout_s: float) -> float | None:
    """Seconds until a request that needs ``name`` succeeds again (``None``: not within
    ``timeout_s``)."""
    started = time.monotonic()
    path, body = PROBES[name]
    while time.monotonic() - started < timeout_s:
        try:
            response = httpx.post(f"{stack.orchestrator.url}{path}", json=body, timeout=120)
            if response.status_code == 200:
                degraded = response.json().get("degraded") or []
                # An untrained critic always answers 503 (degraded "critic"): up is enough.
                if name not in degraded or name == "critic":
                    return round(time.monotonic() - started, 2)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return None


def fault_phase(
    stack: Stack, workload: Workload, recorder: Recorder, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in [n for n in args.faults if n in stack.services]:
        service = stack.services[name]
        with OpenLoop(workload, recorder, rate, args.workers):
            recorder.phase = f"before:{name}"
            time.sleep(args.down_s / 2)
            recorder.phase = f"down:{name}"
            service.kill9()
            down_at = time.monotonic()
            answered = probe(stack, name)
            time.sleep(max(0.0, args.down_s - (time.monotonic() - down_at)))
            service.start()
            ready_s = service.wait_ready()
            recorder.phase = f"back:{name}"
            recovered_s = _recovered(stack, name, args.recover_s)
            time.sleep(args.down_s / 2)
        down = recorder.of(f"down:{name}")
        back = recorder.of(f"back:{name}")
        results[name] = {
            "down_s": args.down_s,
            "restart_ready_s": round(ready_s, 1),
            "recovered": recovered_s is not None,
            "recovered_after_ready_s": recovered_s,
            "probe_while_down": answered,
            "while_down": summarize(down, partial(while_down_unexpected, down=name)),
            "after_restart": summarize(back, partial(while_down_unexpected, down=name)),
        }
    return results


def _feedback(trace_id: str, target: str, key: str) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "stage": "fusion",
        "target_type": "doc",
        "target_id": target,
        "action": "relevant",
        "idempotency_key": key,
    }


@dataclass
class Burst:
    """Feedback posted from several threads until ``stop``; what was acknowledged (201)."""

    url: str
    trace_id: str
    hits: list[str]
    cycle: int
    acked: list[tuple[str, str]] = field(default_factory=list)
    cut: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def thread(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                key = f"crash-{self.cycle}-{index}-{i}"
                body = _feedback(self.trace_id, self.hits[i % len(self.hits)], key)
                try:
                    response = http.post("/feedback", json=body)
                except httpx.HTTPError:
                    with self.lock:
                        self.cut += 1
                    time.sleep(0.05)
                    continue
                if response.status_code == 201:
                    with self.lock:
                        self.acked.append((key, response.json()["feedback_id"]))


def crash_cycles(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Feedback bursts while the orchestrator is killed with SIGKILL; then every acknowledged
    feedback must be found in its trace and be returned again for its idempotency key."""
    orchestrator = stack.orchestrator
    rng = random.Random(11)
    acknowledged = lost = replay_mismatch = cut = 0
    restarts: list[float] = []
    for cycle in range(args.crash_cycles):
        with httpx.Client(base_url=orchestrator.url, timeout=60) as http:
            found = http.post(
                "/search", json={"query": f"topic {cycle}", "collection": COLLECTION, "k": 10}
            ).json()
        burst = Burst(
            orchestrator.url, found["trace_id"], [h["doc_id"] for h in found["hits"]], cycle
        )
        threads = [
            threading.Thread(target=burst.thread, args=(t,)) for t in range(args.burst_threads)
        ]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.2, args.burst_s))
        orchestrator.kill9()
        time.sleep(0.2)
        burst.stop.set()
        for thread in threads:
            thread.join()
        orchestrator.start()
        restarts.append(orchestrator.wait_ready())
        with httpx.Client(base_url=orchestrator.url, timeout=60) as http:
            trace = http.get(f"/traces/{burst.trace_id}").json()
            stored = {f["feedback_id"] for f in trace["feedback"]}
            lost += sum(1 for _, fid in burst.acked if fid not in stored)
            for key, fid in rng.sample(burst.acked, min(3, len(burst.acked))):
                body = _feedback(burst.trace_id, burst.hits[0], key)
                again = http.post("/feedback", json=body).json()
                if again != {"feedback_id": fid, "created": False}:
                    replay_mismatch += 1
        acknowledged += len(burst.acked)
        cut += burst.cut
    return {
        "cycles": args.crash_cycles,
        "burst_threads": args.burst_threads,
        "acknowledged": acknowledged,
        "lost": lost,
        "replay_mismatch": replay_mismatch,
        "requests_cut_by_the_kill": cut,
        "restart_ready_s": {
            "p50": round(float(np.percentile(restarts, 50)), 1) if restarts else None,
            "max": round(max(restarts), 1) if restarts else None,
        },
    }


def corpus_and_queries(n_docs: int) -> tuple[list[dict[str, Any]], list[str]]:
    from shared.datasets import load_nq_open_dev, load_wikipedia_summaries

    docs = load_wikipedia_summaries()[:: max(1, 10000 // (2 * n_docs))][: 2 * n_docs]
    rows = [{"id": d.id, "title": d.title, "text": d.text} for d in docs]
    queries = [e.question for e in load_nq_open_dev()[:200]]
    return rows, queries


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from lodestar.evaluation.common import provenance

    rows, queries = corpus_and_queries(args.docs)
    seed_docs, spare = rows[: args.docs], rows[args.docs :]
    meta = {**provenance(), "args": {k: v for k, v in vars(args).items() if k != "handler"}}
    with tempfile.TemporaryDirectory(prefix="lodestar-soak-") as tmp:
        stack = Stack(tuple(args.services), Path(tmp), settings.resolved_models_dir, dict(args.env))
        try:
            ready = stack.start()
            seed_collection(stack.orchestrator.url, seed_docs)
            workload = Workload(stack.orchestrator.url, spare, queries)
            recorder = Recorder()
            soak = soak_phase(stack, workload, recorder, args)
            faults = fault_phase(stack, workload, recorder, soak["rate_ops_per_s"], args)
            cycles = crash_cycles(stack, args) if args.crash_cycles else None
        finally:
            stack.stop()
    fault_500s = sum(f["while_down"]["server_errors_500"] for f in faults.values()) + sum(
        f["after_restart"]["server_errors_500"] for f in faults.values()
    )
    fault_unexpected = sum(
        f["while_down"]["unexpected"] + f["after_restart"]["unexpected"] for f in faults.values()
    )
    growth = [r["growth_pct"] for r in soak["rss"].values()]
    return {
        "meta": {**meta, "ready_s": ready, "services": list(args.services)},
        "soak": soak,
        "faults": faults,
        "crash_cycles": cycles,
        "summary": {
            "soak_unexpected": soak["unexpected"],
            "soak_max_rss_growth_pct": max(growth) if growth else None,
            "fault_server_errors_500": fault_500s,
            "fault_unexpected": fault_unexpected,
            "all_recovered": all(f["recovered"] for f in faults.values()),
            "feedback_acknowledged": cycles["acknowledged"] if cycles else 0,
            "feedback_lost": cycles["lost"] if cycles else 0,
        },
    }


def command(args: argparse.Namespace, settings: Settings) -> int:
    import json

    result = run(args, settings)
    write_results(Path(args.out), result, json.dumps(result["summary"], indent=1))
    return 0


def register(group: Any) -> None:
    """``lodestar bench soak`` on the ``bench`` group."""
    parser = group.add_parser("soak", help="mixed load, services killed under it, crash cycles")
    parser.add_argument("--services", type=lambda s: s.split(","), default=list(DEFAULT_SERVICES))
    parser.add_argument("--faults", type=lambda s: s.split(","), default=list(DEFAULT_SERVICES))
    parser.add_argument("--docs", type=int, default=300, help="documents in the soak collection")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients (peak)")
    parser.add_argument("--peak-s", type=float, default=60.0)
    parser.add_argument("--fraction", type=float, default=0.7, help="of the measured peak")
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=1800.0, help="soak seconds")
    parser.add_argument("--workers", type=int, default=12, help="open-loop concurrency bound")
    parser.add_argument("--rss-every-s", type=float, default=10.0)
    parser.add_argument("--down-s", type=float, default=10.0, help="seconds each fault lasts")
    parser.add_argument("--recover-s", type=float, default=120.0)
    parser.add_argument("--crash-cycles", type=int, default=100)
    parser.add_argument("--burst-threads", type=int, default=4)
    parser.add_argument("--burst-s", type=float, default=1.5, help="longest burst before a kill")
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in every service's environment (repeatable), e.g. an allocator setting to A/B",
    )
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON report")
    parser.set_defaults(handler=command)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value
