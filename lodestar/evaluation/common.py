"""What the retrieval and RAG evaluations share: paths, collections, latency, significance, JSON."""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from shared.schemas import Document

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
RESULTS_DIR = BENCHMARKS_DIR / "results"
EXPECTED_PATH = BENCHMARKS_DIR / "expected.yaml"
DOCS_DIR = REPO_ROOT / "docs"

#: Bootstrap resamples for the paired significance tests.
BOOTSTRAP_SAMPLES = 10_000

T = TypeVar("T")
D = TypeVar("D")


class EvalUsageError(ValueError):
    """Bad input from the user (unknown dataset, system, split...): the CLI exits with code 2."""


class ExpectedFileError(EvalUsageError):
    """``expected.yaml`` is malformed; the message names the row and the field."""


def parse_names(text: str, known: Mapping[str, T], what: str) -> list[str]:
    """``"dense,bm25"`` -> ``["dense", "bm25"]``; unknown or repeated names raise
    :class:`EvalUsageError` listing the known ones."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise EvalUsageError(f"no {what} given; known: {', '.join(known)}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise EvalUsageError(
            f"unknown {what} {', '.join(repr(n) for n in unknown)}; known: {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise EvalUsageError(f"a {what} is named twice in {text!r}")
    return names


def lookup(name: str, known: Mapping[str, T], what: str) -> T:
    """``known[name]``, or :class:`EvalUsageError` listing the known names."""
    try:
        return known[name]
    except KeyError:
        raise EvalUsageError(f"unknown {what} {name!r}; known: {', '.join(known)}") from None


def resolve_run(
    dataset: str,
    datasets: Mapping[str, D],
    names: Sequence[str],
    known: Mapping[str, T],
    what: str,
    limit: int | None,
) -> tuple[D, list[T]]:
    """An evaluation's dataset and its chosen ``what`` (systems, methods), checked before any
    work: a known dataset, at least one name and each known, and a ``limit`` (first queries or
    questions) that leaves pairs for the significance tests. :class:`EvalUsageError` otherwise."""
    spec = lookup(dataset, datasets, "dataset")
    if not names:
        raise EvalUsageError(f"no {what} given; known: {', '.join(known)}")
    chosen = [lookup(name, known, what) for name in names]
    if limit is not None and limit < 2:
        raise EvalUsageError(f"--limit must be at least 2 (paired tests need pairs), got {limit}")
    return spec, chosen


# --------------------------------------------------------------------------------------------
# Machine and provenance
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on (figures from different machines differ in latency)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def provenance() -> dict[str, Any]:
    """Date, commit, machine, and the load average when the run started (these machines are
    shared: a load above the core count means the latencies include waiting for a core)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        load = None
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "load_avg_at_start": load,
    }


def progress_bar(description: str, *, unit: str = "item") -> Callable[[int, int, str], None]:
    """A ``(done, total, stage)`` callback drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(done: int, total: int, stage: str) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{description}: {stage}", unit=unit)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


# --------------------------------------------------------------------------------------------
# Collections
# --------------------------------------------------------------------------------------------


def collection_name(dataset: str) -> str:
    """The cached collection an evaluation of ``dataset`` searches (e.g. ``eval-scifact``)."""
    return f"eval-{dataset}"


def ensure_collection(
    engine: Any, name: str, load_documents: Callable[[], Sequence[Document]], *, rebuild: bool
) -> str:
    """Build collection ``name`` from the documents (with a progress bar) unless it exists.

    ``engine`` is a ``services.index.engine.IndexEngine``. A cached collection whose document
    count differs from the dataset's is refused (stale or partial): rebuild it. Returns the
    collection version.
    """
    if engine.exists(name) and not rebuild:
        snapshot = engine.snapshot(name)
        documents = load_documents()
        if snapshot.n_documents != len(documents):
            raise EvalUsageError(
                f"collection {name!r} has {snapshot.n_documents} documents but the dataset has "
                f"{len(documents)}; rebuild it with --rebuild"
            )
        return str(snapshot.version)
    documents = load_documents()
    if rebuild and engine.exists(name):
        # A rebuild replaces every document; deleted ones must not linger from the old version.
        stale = {doc.id for doc in engine.snapshot(name).documents} - {d.id for d in documents}
        if stale:
            raise EvalUsageError(
                f"collection {name!r} holds documents the dataset lacks; delete "
                f"{engine.root / name} and run again"
            )
    print(f"building collection {name!r} from {len(documents)} documents (cached afterwards)")
    result = engine.upsert(name, list(documents), progress=progress_bar(name, unit="passage"))
    print(f"collection {name!r}: {result.passages} passages in {result.seconds:.1f} s")
    return str(result.version)


# --------------------------------------------------------------------------------------------
# Latency, significance, JSON
# --------------------------------------------------------------------------------------------


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p95 and mean of per-query latencies, in milliseconds."""
    import numpy as np

    if not values_ms:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan")}
    array = np.asarray(values_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(array, 50)), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "mean": round(float(array.mean()), 2),
    }


def significance_table(
    per_item: Mapping[str, Mapping[str, Mapping[str, Any]]],
    metrics: Sequence[str],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
) -> list[dict[str, Any]]:
    """Paired t-test and bootstrap p-values for every pair of systems and every metric.

    ``per_item`` is ``{system: {item_id: {metric: value}}}``; only items every system of the pair
    has a (non-null) value for are paired, in sorted id order.
    """
    import numpy as np

    from shared.metrics import paired_bootstrap, paired_t_test

    rows: list[dict[str, Any]] = []
    for a, b in itertools.combinations(per_item, 2):
        for metric in metrics:
            ids = sorted(
                item
                for item, values in per_item[a].items()
                if values.get(metric) is not None
                and per_item[b].get(item, {}).get(metric) is not None
            )
            if len(ids) < 2:
                continue
            xs = [float(per_item[a][i][metric]) for i in ids]
            ys = [float(per_item[b][i][metric]) for i in ids]
            t_test = paired_t_test(xs, ys)
            bootstrap = paired_bootstrap(xs, ys, n=samples)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "mean_a": round(float(np.mean(xs)), 4),
                    "mean_b": round(float(np.mean(ys)), 4),
                    "mean_difference": round(t_test.mean_difference, 4),
                    "t_test_p": float(f"{t_test.p_value:.4g}"),
                    "bootstrap_p": float(f"{bootstrap.p_value:.4g}"),
                    "n": t_test.n,
                }
            )
    return rows


def result_tail(
    started: float,
    summaries: tuple[str, Mapping[str, Any]],
    per_item: tuple[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
    metrics: Sequence[str],
) -> dict[str, Any]:
    """The fields a retrieval or RAG result ends with, in this order (the report reads them):
    seconds since ``started`` (``perf_counter``), provenance, the per-system summaries, their
    paired significance on ``metrics`` and the per-item figures it pairs. ``summaries`` and
    ``per_item`` are ``(key, value)``: ``("systems", ...)`` and ``("per_query", ...)`` for
    retrieval, ``("methods", ...)`` and ``("per_question", ...)`` for RAG."""
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        **provenance(),
        summaries[0]: summaries[1],
        "significance": significance_table(per_item[1], metrics),
        per_item[0]: per_item[1],
    }


def format_significance(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of :func:`significance_table` rows."""
    lines = [
        f"{'a':<12} {'b':<12} {'metric':<12} {'mean a':>8} {'mean b':>8} {'a - b':>8} "
        f"{'t-test p':>10} {'bootstrap p':>12}  n",
    ]
    for row in rows:
        lines.append(
            f"{row['a']:<12} {row['b']:<12} {row['metric']:<12} {row['mean_a']:>8.4f} "
            f"{row['mean_b']:>8.4f} {row['mean_difference']:>+8.4f} {row['t_test_p']:>10.3g} "
            f"{row['bootstrap_p']:>12.3g}  {row['n']}"
        )
    return "\n".join(lines)


def significance_block(
    rows: Sequence[Mapping[str, Any]], heading: str = "paired significance (two-sided):"
) -> list[str]:
    """A blank line, ``heading`` and the :func:`format_significance` table; nothing without rows
    (a single system or too few paired items)."""
    return ["", heading, format_significance(rows)] if rows else []


def print_and_save(summary: str, path: Path, result: Mapping[str, Any], per: str) -> None:
    """An ``eval`` command's end: print its summary, write ``result`` (:func:`write_json`) and
    say where the per-``per`` figures went."""
    print(summary)
    write_json(path, result)
    print(f"\nper-{per} results: {path}")


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write atomically (aside, then rename), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def option_below_one(config: Any, names: Sequence[str]) -> str | None:
    """The message for the first of ``names`` (fields of ``config``) below 1, as its CLI flag;
    ``None`` when all are at least 1."""
    for name in names:
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    return None
