"""Expected figures (``benchmarks/expected.yaml``) and the regression check.

Pyserini's "2CR" idea: every figure the project publishes is checked in with a tolerance, and
``lodestar eval check`` re-measures the rows and fails when one drifts beyond its tolerance in
either direction. A drop is a regression; a rise means the code changed what it measures and the
expected figure must be updated on purpose, with the new JSON results committed beside it.

File format::

    version: 1
    rows:
      - id: scifact-test-bm25          # unique
        task: retrieval                # or rag
        dataset: scifact
        split: test                    # retrieval only (default: the dataset's test split)
        system: bm25                   # retrieval: a system; rag: a method
        limit: 30                      # rag only: the first N questions (absent: all)
        ci: true                       # run by `lodestar eval check --ci`
        metrics:
          ndcg@10: {expected: 0.6900, tolerance: 0.005}

Rows that share a task, dataset and split (retrieval) or limit (rag) are measured in one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lodestar.evaluation import rag, retrieval
from lodestar.evaluation.common import EXPECTED_PATH, ExpectedFileError, write_json
from shared.settings import Settings

__all__ = ["ExpectedFileError"]

TASKS = ("retrieval", "rag")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "retrieval": retrieval.METRICS,
    "rag": ("em", "f1", "acc", "support_recall", "rounds"),
}
#: Absolute slack on top of every tolerance, so a figure exactly at the bound passes despite
#: binary floating point (0.6789 + 0.005 is not exactly 0.6839).
EPSILON = 1e-9


@dataclass(frozen=True)
class MetricExpectation:
    metric: str
    expected: float
    tolerance: float


@dataclass(frozen=True)
class ExpectedRow:
    id: str
    task: str
    dataset: str
    system: str
    ci: bool
    metrics: tuple[MetricExpectation, ...]
    split: str | None = None
    limit: int | None = None
    note: str = ""

    @property
    def group(self) -> tuple[str, str, str | None, int | None]:
        """Rows with the same group are measured by one evaluation run."""
        return (self.task, self.dataset, self.split, self.limit)


def _require(row: Mapping[str, Any], key: str, kind: type[Any], where: str) -> Any:
    if key not in row:
        raise ExpectedFileError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ExpectedFileError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExpectedFileError(f"{where} must be a number, got {value!r}")
    return float(value)


def parse_expected(data: Any, source: str = "expected.yaml") -> list[ExpectedRow]:
    """Validate the parsed YAML; every problem names the row (by id or position) and field."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ExpectedFileError(f"{source}: expected a mapping with a 'rows' list")
    rows: list[ExpectedRow] = []
    seen: set[str] = set()
    for position, raw in enumerate(data["rows"], start=1):
        where = f"{source}, row {position}"
        if not isinstance(raw, dict):
            raise ExpectedFileError(f"{where}: expected a mapping")
        row_id = _require(raw, "id", str, where)
        where = f"{source}, row {row_id!r}"
        if row_id in seen:
            raise ExpectedFileError(f"{where}: duplicate id")
        seen.add(row_id)
        task = _require(raw, "task", str, where)
        if task not in TASKS:
            raise ExpectedFileError(f"{where}: unknown task {task!r}; known: {', '.join(TASKS)}")
        dataset = _require(raw, "dataset", str, where)
        system = _require(raw, "system", str, where)
        datasets: Mapping[str, Any] = retrieval.DATASETS if task == "retrieval" else rag.DATASETS
        systems: Mapping[str, Any] = retrieval.SYSTEMS if task == "retrieval" else rag.METHODS
        if dataset not in datasets:
            raise ExpectedFileError(
                f"{where}: unknown {task} dataset {dataset!r}; known: {', '.join(datasets)}"
            )
        if system not in systems:
            raise ExpectedFileError(
                f"{where}: unknown {task} system {system!r}; known: {', '.join(systems)}"
            )
        ci = _require(raw, "ci", bool, where)
        split: str | None = None
        limit: int | None = None
        if task == "retrieval":
            split = raw.get("split") or retrieval.DATASETS[dataset].default_split
            if not isinstance(split, str):
                raise ExpectedFileError(f"{where}: field 'split' must be str")
            if "limit" in raw:
                raise ExpectedFileError(f"{where}: 'limit' applies to rag rows only")
        else:
            if "split" in raw:
                raise ExpectedFileError(f"{where}: 'split' applies to retrieval rows only")
            if raw.get("limit") is not None:
                limit = _require(raw, "limit", int, where)
                if limit < 2:
                    raise ExpectedFileError(f"{where}: 'limit' must be at least 2")
        metrics_raw = _require(raw, "metrics", dict, where)
        if not metrics_raw:
            raise ExpectedFileError(f"{where}: 'metrics' is empty")
        metrics = []
        for metric, spec in metrics_raw.items():
            if metric not in TASK_METRICS[task]:
                raise ExpectedFileError(
                    f"{where}: unknown {task} metric {metric!r}; "
                    f"known: {', '.join(TASK_METRICS[task])}"
                )
            if not isinstance(spec, dict) or set(spec) != {"expected", "tolerance"}:
                raise ExpectedFileError(
                    f"{where}, metric {metric!r}: expected {{expected: X, tolerance: Y}}"
                )
            expected = _number(spec["expected"], f"{where}, {metric}.expected")
            tolerance = _number(spec["tolerance"], f"{where}, {metric}.tolerance")
            if tolerance < 0:
                raise ExpectedFileError(f"{where}, {metric}.tolerance must be >= 0")
            metrics.append(MetricExpectation(metric, expected, tolerance))
        note = raw.get("note", "")
        rows.append(
            ExpectedRow(
                id=row_id,
                task=task,
                dataset=dataset,
                system=system,
                ci=ci,
                metrics=tuple(metrics),
                split=split,
                limit=limit,
                note=str(note),
            )
        )
    return rows


def load_expected(path: Path = EXPECTED_PATH) -> list[ExpectedRow]:
    if not path.is_file():
        raise ExpectedFileError(f"expected-figures file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExpectedFileError(f"{path}: invalid YAML ({exc})") from exc
    return parse_expected(data, str(path))


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    row_id: str
    system: str
    metric: str
    expected: float
    tolerance: float
    measured: float | None

    @property
    def delta(self) -> float | None:
        return None if self.measured is None else self.measured - self.expected

    @property
    def passed(self) -> bool:
        delta = self.delta
        return delta is not None and abs(delta) <= self.tolerance + EPSILON

    @property
    def status(self) -> str:
        delta = self.delta
        if delta is None:
            return "FAIL (not measured)"
        if self.passed:
            return "ok"
        return "FAIL (higher)" if delta > 0 else "FAIL (lower)"


def compare_row(row: ExpectedRow, measured: Mapping[str, float | None]) -> list[CheckOutcome]:
    """One outcome per expected metric of ``row``; ``measured`` maps metric -> value."""
    return [
        CheckOutcome(
            row_id=row.id,
            system=row.system,
            metric=m.metric,
            expected=m.expected,
            tolerance=m.tolerance,
            measured=measured.get(m.metric),
        )
        for m in row.metrics
    ]


def measured_figures(result: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{system or method: {metric: mean}}`` from a retrieval or RAG results document."""
    entries = result["systems"] if result["kind"] == "retrieval" else result["methods"]
    return {name: dict(entry["metrics"]) for name, entry in entries.items()}


def compare(
    rows: Iterable[ExpectedRow],
    measured: Mapping[tuple[str, str, str | None, int | None], Mapping[str, Mapping[str, Any]]],
) -> list[CheckOutcome]:
    """Outcomes of every row, given ``{group: {system: {metric: value}}}``."""
    outcomes: list[CheckOutcome] = []
    for row in rows:
        outcomes.extend(compare_row(row, measured.get(row.group, {}).get(row.system, {})))
    return outcomes


def format_check(outcomes: Sequence[CheckOutcome]) -> str:
    lines = [
        f"{'row':<28} {'metric':<15} {'expected':>9} {'measured':>9} {'delta':>8} "
        f"{'tol':>7}  status"
    ]
    for o in outcomes:
        measured = "—" if o.measured is None else f"{o.measured:.4f}"
        delta = "—" if o.delta is None else f"{o.delta:+.4f}"
        lines.append(
            f"{o.row_id:<28} {o.metric:<15} {o.expected:>9.4f} {measured:>9} {delta:>8} "
            f"{o.tolerance:>7.4f}  {o.status}"
        )
    failed = sum(not o.passed for o in outcomes)
    lines.append(
        f"\n{len(outcomes) - failed}/{len(outcomes)} figures within tolerance"
        + (
            f"; {failed} FAILED. A drop is a regression; a rise must be committed on purpose "
            "(update benchmarks/expected.yaml and benchmarks/results/)."
            if failed
            else "."
        )
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running the check
# --------------------------------------------------------------------------------------------

Group = tuple[str, str, str | None, int | None]
Evaluator = Callable[[Group, list[str]], dict[str, Any]]


def select_rows(rows: Sequence[ExpectedRow], *, ci_only: bool) -> list[ExpectedRow]:
    return [row for row in rows if row.ci or not ci_only]


def groups_of(rows: Sequence[ExpectedRow]) -> dict[Group, list[str]]:
    """``{group: [systems]}`` in file order, each system once."""
    groups: dict[Group, list[str]] = {}
    for row in rows:
        systems = groups.setdefault(row.group, [])
        if row.system not in systems:
            systems.append(row.system)
    return groups


def default_evaluator(settings: Settings, *, show_progress: bool = True) -> Evaluator:
    def evaluate(group: Group, systems: list[str]) -> dict[str, Any]:
        task, dataset, split, limit = group
        if task == "retrieval":
            return retrieval.evaluate_retrieval(
                settings, dataset, systems, split=split, show_progress=show_progress
            )
        return rag.evaluate_rag(
            settings, dataset, systems, limit=limit, show_progress=show_progress
        )

    return evaluate


def result_file_name(group: Group) -> str:
    task, dataset, split, limit = group
    suffix = split if task == "retrieval" else (f"{limit}q" if limit else "all")
    return f"{task}-{dataset}-{suffix}.json"


@dataclass
class CheckReport:
    outcomes: list[CheckOutcome]
    seconds: float
    results: dict[Group, dict[str, Any]]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)


def run_check(
    rows: Sequence[ExpectedRow],
    evaluate: Evaluator,
    *,
    out_dir: Path | None = None,
) -> CheckReport:
    """Measure every group of ``rows`` once and compare; results are written to ``out_dir``."""
    started = time.perf_counter()
    measured: dict[Group, dict[str, dict[str, Any]]] = {}
    results: dict[Group, dict[str, Any]] = {}
    for group, systems in groups_of(rows).items():
        result = evaluate(group, systems)
        results[group] = result
        measured[group] = measured_figures(result)
        if out_dir is not None:
            write_json(out_dir / result_file_name(group), result)
    return CheckReport(compare(rows, measured), time.perf_counter() - started, results)
