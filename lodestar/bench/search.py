"""``lodestar bench search``: ``/search`` under closed-loop load, Lodestar against txtai.

One run, one machine, one load generator, the same queries (NQ-open dev questions), the same
corpus (a built Lodestar collection's passages, default ``wiki``) and the same MiniLM model:

1. **Baseline**: bare sentence-transformers fp32 encoding of one query on one thread, the
   queries one at a time (p50), measured at the start and again at the end of the run (the
   ratios use the mean, so drift on a shared machine favours neither side); the ONNX query
   encoder's p50 beside it.
2. **Lodestar**: the index service and the orchestrator started as ``lodestar up`` starts them
   (same process specs and environment, on bench ports, traces in a throw-away store), then
   ``POST /search`` on the orchestrator (dense + BM25, RRF, k 10).
3. **txtai** (optional, ``--txtai-venv``): txtai's own API app over a txtai hybrid index
   (BM25 + dense) of the same passages with the same MiniLM directory, ``GET /search``,
   installed only in its own venv (``lodestar/bench/txtai_peer.py`` runs there).

Each system runs closed-loop clients (each sends its next request when the last returns) at
every level of ``--clients``, for ``--duration`` seconds after a warm-up: p50/p95/p99 latency,
throughput, errors; and the ratios the targets in docs/search-performance.md are stated in
(latency p50 / encode p50, throughput x encode p50). The raw JSON goes to
``benchmarks/results/search_bench.json``. Absolute times on shared cores mean little; the ratios
inside one run are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lodestar.bench.common import stop_group
from lodestar.stack import SINGLE_THREADED
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "search_bench.json"
PEER_SCRIPT = Path(__file__).resolve().parent / "txtai_peer.py"
TXTAI_VERSION = "9.14.0"


def nq_queries(n: int) -> list[str]:
    from shared.datasets import load_nq_open_dev

    return [example.question for example in load_nq_open_dev()[:n]]


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    arr = np.asarray(values_ms)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


def encode_baseline(queries: list[str], settings: Settings) -> dict[str, Any]:
    """p50 of one query at a time on one thread: sentence-transformers fp32 and the ONNX path."""
    import torch

    from shared.models import Embedder

    torch.set_num_threads(1)
    embedder = Embedder(
        "cpu", 64, query_encoder="onnx", models_dir=settings.resolved_models_dir, query_threads=1
    )
    out: dict[str, Any] = {}

    def fp32(query: str) -> np.ndarray:
        return embedder.encode([query])

    def query_path(query: str) -> np.ndarray:
        return embedder.encode_queries([query])

    encoders: list[tuple[str, Callable[[str], np.ndarray]]] = [
        ("fp32_sentence_transformers", fp32),
        (embedder.query_backend, query_path),
    ]
    for name, encode in encoders:
        for query in queries[:10]:
            encode(query)
        times = []
        for query in queries:
            started = time.perf_counter()
            encode(query)
            times.append((time.perf_counter() - started) * 1000)
        out[name] = _percentiles(times)
    return out


# --- processes ---------------------------------------------------------------------------------


class Process:
    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.popen = subprocess.Popen(
            command,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=str(ROOT),
        )

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        stop_group(self.popen)


def start_lodestar(
    settings: Settings, work: Path, port_base: int, extra_env: dict[str, str]
) -> list[Process]:
    """The index service and the orchestrator, with ``lodestar up``'s specs and environment."""
    from lodestar.stack import STACK

    specs = {spec.name: spec for spec in STACK}
    env = {
        **os.environ,
        "LODESTAR_DATA_DIR": str(settings.data_dir.resolve()),
        "LODESTAR_MODELS_DIR": str(settings.resolved_models_dir.resolve()),
        "LODESTAR_DATABASE_URL": f"sqlite:///{work / 'store.sqlite3'}",
        "LODESTAR_INDEX_PORT": str(port_base + 1),
        "LODESTAR_ORCHESTRATOR_PORT": str(port_base),
        "LODESTAR_INDEX_URL": f"http://127.0.0.1:{port_base + 1}",
        "LODESTAR_LOG_JSON": "false",
        **extra_env,
    }
    processes = []
    for name, port in (("index", port_base + 1), ("orchestrator", port_base)):
        spec = specs[name]
        process = Process(
            f"lodestar-{name}",
            spec.command(),
            {**dict(spec.env), **env},
            work / f"lodestar-{name}.log",
        )
        processes.append(process)
        process.wait_ready(f"http://127.0.0.1:{port}/readyz", 600)
    return processes


def txtai_index(venv: Path, settings: Settings, collection: str, cache: Path) -> Path:
    """txtai's hybrid index of the collection's live passages (built once per content: the
    cache key is the SHA-256 of the live passage records, so writes that were undone, or
    tombstoned rows, do not force a rebuild nor leak deleted passages into txtai)."""
    import hashlib

    from services.index.engine import IndexEngine
    from services.index.records import JsonlRecords
    from shared.models import embedder_path

    engine = IndexEngine.from_settings(settings)
    snapshot = engine.snapshot(collection)
    passages = snapshot.passages
    if not isinstance(passages, JsonlRecords):
        raise SystemExit(f"collection {collection!r} has no passage file")
    live_rows = np.flatnonzero(snapshot.live).tolist()
    digest = hashlib.sha256()
    for row in live_rows:
        digest.update(passages.raw_span(row, row + 1))
    out = cache / f"{collection}-{digest.hexdigest()[:16]}"
    if not (out / "bench-build.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        live_file = cache / f"{out.name}.passages.jsonl"
        with live_file.open("wb") as handle:
            for row in live_rows:
                handle.write(passages.raw_span(row, row + 1))
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                str(PEER_SCRIPT),
                "build",
                "--passages",
                str(live_file),
                "--model",
                str(embedder_path()),
                "--out",
                str(out),
            ],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
        )
    return out


def start_txtai(venv: Path, index: Path, work: Path, port: int) -> Process:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # As Lodestar's index service: one thread per request on the shared cores.
        **dict(SINGLE_THREADED),
    }
    process = Process(
        "txtai",
        [
            str(venv / "bin" / "python"),
            str(PEER_SCRIPT),
            "serve",
            "--index",
            str(index),
            "--port",
            str(port),
        ],
        env,
        work / "txtai.log",
    )
    process.wait_ready(f"http://127.0.0.1:{port}/search?query=warm&limit=1", 600)
    return process


# --- the load generator ------------------------------------------------------------------------

Request = Callable[[Any, str], Any]


async def closed_loop(
    send: Callable[[Any, str], Any],
    base_url: str,
    queries: list[str],
    clients: int,
    duration_s: float,
    warmup_s: float,
    processes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """``clients`` loops, each on its own keep-alive connection, each sending its next request
    when the last returns; latencies of requests started after the warm-up and finished before
    the end. ``processes`` (name -> pid): each one's CPU time over the measured window per
    request (``cpu_ms_per_request``), what says which process the load saturates."""
    import httpx

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    async def client(index: int) -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as http:
            i = index * 7919
            while True:
                now = time.perf_counter()
                if now >= end:
                    return
                query = queries[i % len(queries)]
                i += 1
                try:
                    response = await send(http, query)
                    ok = response.status_code == 200
                except Exception:
                    ok = False
                done = time.perf_counter()
                if now >= measure_from and done <= end:
                    if ok:
                        latencies.append((done - now) * 1000)
                    else:
                        errors += 1

    watched = dict(processes or {})
    cpu: dict[str, float] = {}

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        first = {name: cpu_seconds(pid) for name, pid in watched.items()}
        first_here = time.process_time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu.update({name: cpu_seconds(pid) - first[name] for name, pid in watched.items()})
        if watched:
            cpu["load generator"] = time.process_time() - first_here

    await asyncio.gather(cpu_window(), *(client(i) for i in range(clients)))
    row: dict[str, Any] = {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / duration_s, 2),
        **_percentiles(latencies),
    }
    if cpu:
        row["cpu_ms_per_request"] = {
            name: round(seconds * 1000 / max(len(latencies), 1), 2) for name, seconds in cpu.items()
        }
    return row


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _lodestar_send(collection: str, k: int) -> Callable[[Any, str], Any]:
    async def send(http: Any, query: str) -> Any:
        return await http.post("/search", json={"query": query, "collection": collection, "k": k})

    return send


def _txtai_send(k: int) -> Callable[[Any, str], Any]:
    async def send(http: Any, query: str) -> Any:
        return await http.get("/search", params={"query": query, "limit": k})

    return send


def _timings_sample(base_url: str, queries: list[str], collection: str) -> dict[str, float]:
    """Median of each ``timings_ms`` entry over 30 single requests (where the time goes)."""
    import httpx

    samples: dict[str, list[float]] = {}
    with httpx.Client(base_url=base_url, timeout=30.0) as http:
        for query in queries[:30]:
            body = http.post("/search", json={"query": query, "collection": collection}).json()
            for key, value in body.get("timings_ms", {}).items():
                samples.setdefault(key, []).append(float(value))
    return {key: round(float(np.median(v)), 2) for key, v in samples.items()}


def upsert_to_searchable(base_url: str, collection: str, n: int) -> dict[str, Any]:
    """One-document upserts through the orchestrator, each timed from sending the PUT until a
    search returns the new document (the write publishes before it answers, so the first
    search should); then the documents are deleted again (timed too)."""
    import httpx

    searchable: list[float] = []
    deletes: list[float] = []
    with httpx.Client(base_url=base_url, timeout=120.0) as http:
        for i in range(n):
            word = f"benchzorblax{i}q{int(time.time() * 1000) % 100000}"
            doc = {
                "id": f"bench-upsert-{word}",
                "title": f"Bench upsert {word}",
                "text": f"{word} is a fictional purple moon used to time one-document upserts.",
            }
            started = time.perf_counter()
            put = http.put(f"/collections/{collection}/documents", json={"documents": [doc]})
            put.raise_for_status()
            for _ in range(100):
                hits = http.post(
                    "/search", json={"query": word, "collection": collection, "k": 3}
                ).json()["hits"]
                if any(hit["doc_id"] == doc["id"] for hit in hits):
                    break
            else:
                raise RuntimeError(f"upserted {doc['id']} never became searchable")
            searchable.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            http.delete(f"/collections/{collection}/documents/{doc['id']}").raise_for_status()
            deletes.append((time.perf_counter() - started) * 1000)
    return {
        "upserts": n,
        "upsert_to_searchable_ms": _percentiles(searchable),
        "delete_ms": _percentiles(deletes),
        "raw_upsert_to_searchable_ms": [round(v, 1) for v in searchable],
    }


def cmd_bench_search(args: argparse.Namespace, settings: Settings) -> int:
    from lodestar.evaluation.common import provenance, write_json

    queries = nq_queries(args.queries)
    levels = [int(c) for c in args.clients.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    report: dict[str, Any] = {
        "meta": {
            **provenance(),
            "collection": args.collection,
            "queries": len(queries),
            "query_source": "NQ-open dev questions",
            "clients": levels,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "k": args.k,
        },
        "systems": {},
    }
    print("encode baseline (one thread, one query at a time) ...", flush=True)
    before = encode_baseline(queries, settings)
    print(json.dumps(before), flush=True)
    with tempfile.TemporaryDirectory(prefix="lodestar-bench-search-") as tmp:
        work = Path(tmp)
        for system in systems:
            processes: list[Process] = []
            try:
                if system == "lodestar":
                    processes = start_lodestar(settings, work, args.port_base, {})
                    url = f"http://127.0.0.1:{args.port_base}"
                    send = _lodestar_send(args.collection, args.k)
                elif system == "lodestar-fp32":
                    processes = start_lodestar(
                        settings, work, args.port_base, {"LODESTAR_QUERY_ENCODER": "torch"}
                    )
                    url = f"http://127.0.0.1:{args.port_base}"
                    send = _lodestar_send(args.collection, args.k)
                elif system == "txtai":
                    venv = Path(args.txtai_venv)
                    if not (venv / "bin" / "python").exists():
                        raise SystemExit(
                            f"no txtai venv at {venv}; create it (txtai never enters Lodestar's "
                            f"own environment):\n  python3.11 -m venv {venv} && {venv}/bin/pip "
                            f'install -c constraints.txt "txtai[api]=={TXTAI_VERSION}"'
                        )
                    index = txtai_index(venv, settings, args.collection, Path(args.txtai_cache))
                    processes = [start_txtai(venv, index, work, args.port_base + 100)]
                    url = f"http://127.0.0.1:{args.port_base + 100}"
                    send = _txtai_send(args.k)
                else:
                    raise SystemExit(f"unknown system {system!r}")
                rows = []
                for clients in levels:
                    pids = {p.name: p.popen.pid for p in processes}
                    row = asyncio.run(
                        closed_loop(send, url, queries, clients, args.duration, args.warmup, pids)
                    )
                    print(f"{system} {json.dumps(row)}", flush=True)
                    rows.append(row)
                entry: dict[str, Any] = {"levels": rows}
                if system.startswith("lodestar"):
                    entry["timings_ms_median"] = _timings_sample(url, queries, args.collection)
                    if args.upserts and system == "lodestar":
                        entry["writes"] = upsert_to_searchable(url, args.collection, args.upserts)
                        print(f"{system} writes {json.dumps(entry['writes'])}", flush=True)
                report["systems"][system] = entry
            finally:
                for process in reversed(processes):
                    process.stop()
    if args.write_sizes:
        sizes = [int(n) for n in args.write_sizes.split(",")]
        report["write_path"] = write_path(settings, sizes, args.upserts)
    after = encode_baseline(queries, settings)
    fp32 = [before["fp32_sentence_transformers"]["p50"], after["fp32_sentence_transformers"]["p50"]]
    encode_p50 = float(np.mean(fp32))
    report["baseline"] = {
        "encode_p50_ms": round(encode_p50, 3),
        "before": before,
        "after": after,
    }
    for entry in report["systems"].values():
        for row in entry["levels"]:
            row["p50_over_encode"] = round(row["p50"] / encode_p50, 3)
            row["throughput_x_encode"] = round(row["throughput_rps"] * encode_p50 / 1000, 3)
        if "writes" in entry:
            p50 = entry["writes"]["upsert_to_searchable_ms"]["p50"]
            entry["writes"]["upsert_to_searchable_over_encode"] = round(p50 / encode_p50, 1)
    for row in report.get("write_path", []):
        p50 = row["upsert_to_searchable_ms"]["p50"]
        row["upsert_to_searchable_over_encode"] = round(p50 / encode_p50, 1)
    write_json(Path(args.out), report)
    print(render_table(report))
    print(f"wrote {args.out}")
    return 0


def render_table(report: dict[str, Any]) -> str:
    lines = [
        f"bare fp32 encode p50: {report['baseline']['encode_p50_ms']} ms",
        "| system | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | "
        "p50 ÷ encode p50 | req/s × encode p50 | CPU ms a request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, entry in report["systems"].items():
        for row in entry["levels"]:
            cpu = ", ".join(f"{k} {v}" for k, v in row.get("cpu_ms_per_request", {}).items())
            lines.append(
                f"| {system} | {row['clients']} | {row['requests']} | {row['errors']} | "
                f"{row['throughput_rps']} | {row['p50']} | {row['p95']} | {row['p99']} | "
                f"{row['p50_over_encode']} | {row['throughput_x_encode']} | {cpu or '-'} |"
            )
    return "\n".join(lines)


def register(bench: Any) -> None:
    """``lodestar bench search`` on the ``bench`` group."""
    search = bench.add_parser(
        "search", help="/search latency and throughput under closed-loop load, vs txtai"
    )
    search.add_argument("--collection", default="wiki")
    search.add_argument("--systems", default="lodestar,txtai", help="lodestar,lodestar-fp32,txtai")
    search.add_argument("--clients", default="1,4,8")
    search.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    search.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    search.add_argument("--queries", type=int, default=200, help="NQ-open dev questions")
    search.add_argument("--k", type=int, default=10)
    search.add_argument(
        "--upserts", type=int, default=5, help="one-document upserts timed to searchable"
    )
    search.add_argument("--port-base", type=int, default=18000)
    search.add_argument(
        "--write-sizes",
        default="10000,100000",
        help="passages of the in-process write-path collections ('' skips them)",
    )
    search.add_argument("--txtai-venv", default="var/bench-txtai-venv")
    search.add_argument("--txtai-cache", default="var/bench-txtai")
    search.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    search.set_defaults(handler=cmd_bench_search)


# --- the write path at 10k and 100k passages (in-process) --------------------------------------


class _ReplayEmbedder:
    """Passage vectors replayed from a built collection (by text), so building a large
    benchmark collection costs no encoding; any other text is encoded by the real model."""

    def __init__(self, real: Any, vectors: dict[str, np.ndarray]) -> None:
        self.real = real
        self.vectors = vectors
        self.batch_size = real.batch_size
        self.model_id, self.dim = real.model_id, real.dim

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            for text, vector in zip(missing, self.real.encode(missing), strict=True):
                self.vectors[text] = vector
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        result: np.ndarray = self.real.encode_queries(texts)
        return result


def write_path(settings: Settings, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """One-document upsert -> searchable in the engine (what the index service runs), at each
    size: a collection of the wiki passages repeated under new ids up to ``size`` passages
    (their stored vectors replayed, the default ANN configuration), then ``repeats`` upserts of
    a new document, each timed until a BM25 and a dense search return it, then deleted."""
    from services.index.engine import IndexEngine, embedding_text
    from shared.models import get_embedder
    from shared.schemas import Document

    source = IndexEngine.from_settings(settings)
    snapshot = source.snapshot("wiki")
    texts = [embedding_text(snapshot.passages[i]) for i in range(len(snapshot.passages))]
    vectors = {t: np.asarray(snapshot.exact.embeddings[i]) for i, t in enumerate(texts)}
    base_docs = [snapshot.documents[i] for i in range(snapshot.n_documents)]
    replay = _ReplayEmbedder(get_embedder(settings), vectors)
    rows = []
    for size in sizes:
        docs: list[Document] = []
        copy = 0
        while len(docs) < size:
            for doc in base_docs:
                if len(docs) >= size:
                    break
                docs.append(doc.model_copy(update={"id": f"{doc.id}~{copy}"}) if copy else doc)
            copy += 1
        with tempfile.TemporaryDirectory(prefix="lodestar-bench-writes-") as tmp:
            engine = IndexEngine(Path(tmp), lambda: replay)  # type: ignore[arg-type, return-value]
            started = time.perf_counter()
            for start in range(0, len(docs), 20000):
                engine.upsert("bench", docs[start : start + 20000])
            if engine.merge("bench").merge_due:  # as the Celery merge after a bulk ingest
                raise RuntimeError("a merge left a merge due")
            build_s = time.perf_counter() - started
            engine.search("bench", "warm up", 3, ["bm25", "dense"])  # load, first query
            searchable, writes = [], []
            for i in range(repeats):
                word = f"benchquokka{i}x{size}"
                doc = Document(id=f"new-{word}", title=word, text=f"{word} is a purple moon.")
                started = time.perf_counter()
                result = engine.upsert("bench", [doc])
                written = time.perf_counter()
                snap, found, _ = engine.search("bench", word, 3, ["bm25", "dense"])
                assert all(snap.documents[r[0].doc_index].id == doc.id for r in found.values())
                searchable.append((time.perf_counter() - started) * 1000)
                writes.append((written - started) * 1000)
                engine.delete("bench", doc.id)
            info = engine.snapshot("bench")
            rows.append(
                {
                    "passages": int(info.n_passages),
                    "dense_backend": info.dense.name,
                    "build_s": round(build_s, 1),
                    "upsert_ms": _percentiles(writes),
                    "upsert_to_searchable_ms": _percentiles(searchable),
                    "merge_due_after_last": result.merge_due,
                }
            )
            print(f"writes {json.dumps(rows[-1])}", flush=True)
    return rows
