"""``lodestar bench answer``: ``/answer`` throughput with generation in the orchestrator vs on
the generator service, at 1 and 4 concurrent questions (docs/generator.md).

Two configurations of the same stack, started as ``lodestar up`` starts it (bench ports, a
throw-away trace store, no critic, so every call runs the server's default rounds):

- ``in-process``: the orchestrator generates with its own SmolLM2 (``LODESTAR_GENERATOR_URL``
  empty) — what ``/answer`` did before the generator service;
- ``service``: the orchestrator sends every generation (answers, sub-queries, follow-up
  queries) to ``python -m services.generator`` over the OpenAI protocol, which batches
  concurrent requests.

Each configuration answers the same NQ-open dev questions with the default request
(``{"question", "collection"}``: default k, rounds and token budget) at each concurrency level
(closed loop: each client asks its next question when the last is answered). Reported:
answers per minute, latency p50 / max beside the request deadline (``request_timeout_s``), the
rounds run, and the service's throughput over in-process's at each level. Writes
``benchmarks/results/answer_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lodestar.bench.common import write_results
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "answer_bench.json"
CONFIGS = ("in-process", "service")


async def _closed_loop(
    url: str, questions: list[str], clients: int, collection: str
) -> dict[str, Any]:
    import httpx

    pending = list(questions)
    latencies: list[float] = []
    rounds: list[int] = []
    errors: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            question = pending.pop(0)
            started = time.perf_counter()
            response = await http.post(
                "/answer", json={"question": question, "collection": collection}
            )
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                continue
            latencies.append(time.perf_counter() - started)
            rounds.append(len(response.json().get("rounds") or []))

    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {
        "clients": clients,
        "answers": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 2),
        "answers_per_min": round(60 * len(latencies) / seconds, 3),
        "latency_s_p50": round(statistics.median(latencies), 2) if latencies else None,
        "latency_s_max": round(max(latencies), 2) if latencies else None,
        "rounds_mean": round(statistics.fmean(rounds), 2) if rounds else None,
    }


def _start(config: str, settings: Settings, work: Path, port_base: int) -> list[Any]:
    from lodestar.bench.search import Process, start_lodestar
    from lodestar.stack import STACK

    # Nothing listens there: no critic, so both configurations run the default rounds.
    no_critic = {"LODESTAR_CRITIC_URL": f"http://127.0.0.1:{port_base + 6}"}
    if config == "in-process":
        return start_lodestar(
            settings, work, port_base, {**no_critic, "LODESTAR_GENERATOR_URL": ""}
        )
    port = port_base + 7
    spec = next(s for s in STACK if s.name == "generator")
    env = {
        **os.environ,
        **dict(spec.env),
        "LODESTAR_DATA_DIR": str(settings.data_dir.resolve()),
        "LODESTAR_MODELS_DIR": str(settings.resolved_models_dir.resolve()),
        "LODESTAR_GENERATOR_PORT": str(port),
        "LODESTAR_LOG_JSON": "false",
    }
    generator = Process("generator", spec.command(), env, work / "generator.log")
    generator.wait_ready(f"http://127.0.0.1:{port}/readyz", 600)
    url = f"http://127.0.0.1:{port}"
    remote = {**no_critic, "LODESTAR_GENERATOR_URL": url}
    return [generator, *start_lodestar(settings, work, port_base, remote)]


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from lodestar.bench.search import nq_queries
    from lodestar.evaluation.common import provenance

    questions = nq_queries(args.questions)
    levels = [int(c) for c in args.clients.split(",")]
    results: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    # Both stacks up at once, the configurations alternating level by level, so a change in
    # the shared machine's load falls on both alike.
    bases = {config: args.port_base + 20 * n for n, config in enumerate(CONFIGS)}
    processes: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="lodestar-bench-answer-") as tmp:
        try:
            for config, base in bases.items():
                work = Path(tmp) / config
                work.mkdir()
                processes += _start(config, settings, work, base)
                url = f"http://127.0.0.1:{base}"
                asyncio.run(_closed_loop(url, questions[:1], 1, args.collection))  # warm up
            for clients in levels:
                for config, base in bases.items():
                    url = f"http://127.0.0.1:{base}"
                    row = asyncio.run(_closed_loop(url, questions, clients, args.collection))
                    print(f"{config} {row}", flush=True)
                    results[config].append(row)
        finally:
            for process in reversed(processes):
                process.stop()
    ratios = {
        str(row["clients"]): round(row["answers_per_min"] / base["answers_per_min"], 3)
        for row, base in zip(results["service"], results["in-process"], strict=True)
        if base["answers_per_min"]
    }
    return {
        "meta": {
            **provenance(),
            "collection": args.collection,
            "questions": len(questions),
            "query_source": "NQ-open dev questions",
            "request": "default /answer (question and collection only), no critic",
            "request_deadline_s": settings.request_timeout_s,
        },
        "configs": results,
        "service_over_in_process_throughput": ratios,
    }


def format_table(result: dict[str, Any]) -> str:
    deadline = result["meta"]["request_deadline_s"]
    lines = [
        f"request deadline: {deadline} s",
        "| generation | clients | answers | errors | answers/min | p50 s | max s | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, rows in result["configs"].items():
        for row in rows:
            lines.append(
                f"| {config} | {row['clients']} | {row['answers']} | {len(row['errors'])} | "
                f"{row['answers_per_min']} | {row['latency_s_p50']} | {row['latency_s_max']} | "
                f"{row['rounds_mean']} |"
            )
    ratios = ", ".join(
        f"{c} clients {r}x" for c, r in result["service_over_in_process_throughput"].items()
    )
    lines.append(f"service / in-process throughput: {ratios}")
    return "\n".join(lines)


def command(args: argparse.Namespace, settings: Settings) -> int:
    result = run(args, settings)
    write_results(Path(args.out), result, format_table(result))
    return 0


def register(group: Any) -> None:
    """``lodestar bench answer`` on the ``bench`` group."""
    parser = group.add_parser(
        "answer", help="/answer throughput: in-process generation vs the generator service"
    )
    parser.add_argument("--collection", default="wiki")
    parser.add_argument("--questions", type=int, default=8, help="NQ-open dev questions per level")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--port-base", type=int, default=18400)
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results")
    parser.set_defaults(handler=command)
