"""The expected-figures regression check: parsing, tolerance logic, grouping, CLI exit codes.

Pure logic: no model is loaded and no collection is built (evaluations are faked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lodestar.cli import main
from lodestar.evaluation.expected import (
    CheckOutcome,
    ExpectedFileError,
    compare_row,
    format_check,
    load_expected,
    parse_expected,
    run_check,
    select_rows,
)


def _rows(*, bm25: float = 0.69, tolerance: float = 0.005) -> dict[str, Any]:
    return {
        "version": 1,
        "rows": [
            {
                "id": "scifact-bm25",
                "task": "retrieval",
                "dataset": "scifact",
                "split": "test",
                "system": "bm25",
                "ci": True,
                "metrics": {
                    "ndcg@10": {"expected": bm25, "tolerance": tolerance},
                    "recall@100": {"expected": 0.92, "tolerance": 0.01},
                },
            },
            {
                "id": "scifact-dense",
                "task": "retrieval",
                "dataset": "scifact",
                "system": "dense",
                "ci": True,
                "metrics": {"ndcg@10": {"expected": 0.65, "tolerance": 0.005}},
            },
            {
                "id": "nq-30-single",
                "task": "rag",
                "dataset": "nq-oracle",
                "limit": 30,
                "system": "single",
                "ci": False,
                "metrics": {"em": {"expected": 0.30, "tolerance": 0.05}},
            },
        ],
    }


def _retrieval_result(figures: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {
        "kind": "retrieval",
        "systems": {name: {"metrics": metrics} for name, metrics in figures.items()},
    }


def _rag_result(figures: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    return {"kind": "rag", "methods": {name: {"metrics": m} for name, m in figures.items()}}


# --- tolerance -------------------------------------------------------------------------------


def test_figure_within_tolerance_passes_and_beyond_fails_in_both_directions() -> None:
    (row, *_) = parse_expected(_rows(bm25=0.6900, tolerance=0.005))
    within = compare_row(row, {"ndcg@10": 0.6940, "recall@100": 0.9200})
    assert [o.passed for o in within] == [True, True]
    lower = compare_row(row, {"ndcg@10": 0.6840, "recall@100": 0.9200})
    assert lower[0].passed is False
    assert lower[0].status == "FAIL (lower)"
    assert lower[0].delta == pytest.approx(-0.006)
    higher = compare_row(row, {"ndcg@10": 0.6960, "recall@100": 0.9200})
    assert higher[0].status == "FAIL (higher)"  # a rise must be committed on purpose too


def test_figure_exactly_at_the_tolerance_bound_passes() -> None:
    (row, *_) = parse_expected(_rows(bm25=0.6789, tolerance=0.005))
    # 0.6839 - 0.6789 is 0.00500000000000001 in binary floating point.
    (outcome, _) = compare_row(row, {"ndcg@10": 0.6839, "recall@100": 0.92})
    assert outcome.passed


def test_zero_tolerance_demands_the_exact_figure() -> None:
    (row, *_) = parse_expected(_rows(bm25=0.69, tolerance=0.0))
    assert compare_row(row, {"ndcg@10": 0.69, "recall@100": 0.92})[0].passed
    assert not compare_row(row, {"ndcg@10": 0.6901, "recall@100": 0.92})[0].passed


def test_a_metric_that_was_not_measured_fails() -> None:
    (row, *_) = parse_expected(_rows())
    outcomes = compare_row(row, {"ndcg@10": 0.69})
    assert outcomes[1].metric == "recall@100"
    assert outcomes[1].measured is None
    assert outcomes[1].status == "FAIL (not measured)"
    assert not outcomes[1].passed


def test_format_check_names_each_failure_and_counts() -> None:
    outcomes = [
        CheckOutcome("r1", "bm25", "ndcg@10", 0.69, 0.005, 0.691),
        CheckOutcome("r2", "dense", "ndcg@10", 0.65, 0.005, 0.60),
    ]
    text = format_check(outcomes)
    assert "r2" in text and "FAIL (lower)" in text and "-0.0500" in text
    assert "1/2 figures within tolerance; 1 FAILED" in text


# --- running the check with a fake evaluation -------------------------------------------------


def test_run_check_measures_each_group_once_and_fails_on_a_perturbed_figure(
    tmp_path: Path,
) -> None:
    rows = parse_expected(_rows(bm25=0.69))
    calls: list[tuple[Any, list[str]]] = []
    figures = {
        "bm25": {"ndcg@10": 0.69, "recall@100": 0.92},
        "dense": {"ndcg@10": 0.65},
    }

    def evaluate(group: Any, systems: list[str]) -> dict[str, Any]:
        calls.append((group, systems))
        if group[0] == "retrieval":
            return _retrieval_result({s: figures[s] for s in systems})
        return _rag_result({"single": {"em": 0.31}})

    report = run_check(rows, evaluate, out_dir=tmp_path)
    assert report.passed
    assert calls == [
        (("retrieval", "scifact", "test", None), ["bm25", "dense"]),
        (("rag", "nq-oracle", None, 30), ["single"]),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rag-nq-oracle-30q.json",
        "retrieval-scifact-test.json",
    ]

    figures["dense"]["ndcg@10"] = 0.65 - 0.02  # a regression of 2 points
    report = run_check(rows, evaluate)
    assert not report.passed
    assert [o.row_id for o in report.outcomes if not o.passed] == ["scifact-dense"]


def test_select_rows_keeps_only_ci_rows_with_ci() -> None:
    rows = parse_expected(_rows())
    assert [r.id for r in select_rows(rows, ci_only=True)] == ["scifact-bm25", "scifact-dense"]
    assert len(select_rows(rows, ci_only=False)) == 3


def test_retrieval_rows_default_to_the_test_split() -> None:
    rows = parse_expected(_rows())
    assert rows[1].split == "test"
    assert rows[0].group == rows[1].group


# --- malformed files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda r: r.update(dataset="msmarco"),
            "unknown retrieval dataset 'msmarco'; known: scifact",
        ),
        (lambda r: r.update(system="colbert"), "unknown retrieval system 'colbert'; known: dense"),
        (lambda r: r.update(task="rerank"), "unknown task 'rerank'"),
        (lambda r: r.pop("ci"), "missing field 'ci'"),
        (lambda r: r.update(ci="yes"), "field 'ci' must be bool"),
        (lambda r: r["metrics"].update({"ndcg@5": {"expected": 1, "tolerance": 0}}), "ndcg@5"),
        (
            lambda r: r["metrics"].update({"ndcg@10": {"expected": 0.7}}),
            "{expected: X, tolerance: Y}",
        ),
        (
            lambda r: r["metrics"].update({"ndcg@10": {"expected": 0.7, "tolerance": -1}}),
            "tolerance must be >= 0",
        ),
        (lambda r: r.update(limit=30), "'limit' applies to rag rows only"),
    ],
)
def test_malformed_rows_are_refused_with_the_row_named(mutate: Any, message: str) -> None:
    data = _rows()
    mutate(data["rows"][0])
    with pytest.raises(ExpectedFileError) as info:
        parse_expected(data, "x.yaml")
    assert "x.yaml" in str(info.value)
    assert message in str(info.value)


def test_duplicate_row_ids_are_refused() -> None:
    data = _rows()
    data["rows"][1]["id"] = "scifact-bm25"
    with pytest.raises(ExpectedFileError, match="duplicate id"):
        parse_expected(data)


def test_the_checked_in_file_is_valid_and_has_cheap_ci_rows() -> None:
    rows = load_expected()
    ci = select_rows(rows, ci_only=True)
    assert {(r.dataset, r.system) for r in ci if r.task == "retrieval"} == {
        ("scifact", "dense"),
        ("scifact", "bm25"),
        ("scifact", "rrf"),
    }
    # CI RAG rows must be a small subset, never a full dataset.
    assert all(r.limit is not None and r.limit <= 50 for r in ci if r.task == "rag")
    assert any(r.task == "rag" for r in ci)


# --- the command line -------------------------------------------------------------------------


def test_cli_unknown_dataset_or_system_exits_2_listing_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["eval", "retrieval", "--dataset", "msmarco"]) == 2
    assert "unknown dataset 'msmarco'; known: scifact" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--systems", "dense,colbert"]) == 2
    assert "unknown system 'colbert'; known: dense, bm25, rrf" in capsys.readouterr().err
    assert main(["eval", "rag", "--dataset", "triviaqa"]) == 2
    assert "known: hotpotqa-dev, nq-oracle" in capsys.readouterr().err
    assert main(["eval", "rag", "--dataset", "nq-oracle", "--methods", "ircot"]) == 2
    assert "unknown method 'ircot'; known: none, single" in capsys.readouterr().err


def test_cli_check_with_a_malformed_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "expected.yaml"
    data = _rows()
    data["rows"][0]["system"] = "colbert"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["eval", "check", "--expected", str(path)]) == 2
    assert "unknown retrieval system 'colbert'" in capsys.readouterr().err


# --- the scoring helpers the RAG rows rely on -------------------------------------------------


def test_answer_accuracy_needs_the_gold_answer_as_whole_words() -> None:
    from lodestar.evaluation.rag import answer_in_prediction

    assert (
        answer_in_prediction(
            "It was awarded to Wilhelm Conrad Röntgen.", ["Wilhelm Conrad Röntgen"]
        )
        == 1.0
    )
    assert answer_in_prediction("The Eagles won in 2017", ["2017", "Super Bowl LII"]) == 1.0
    assert answer_in_prediction("in 2017", ["1"]) == 0.0  # "1" is inside "2017", not a word
    assert answer_in_prediction("", ["Paris"]) == 0.0


def test_support_recall_accumulates_over_rounds() -> None:
    from lodestar.evaluation.rag import support_recall_per_round

    rounds = [["a", "x"], ["y"], ["b", "a"]]
    assert support_recall_per_round(rounds, ["a", "b"]) == [0.5, 0.5, 1.0]
    assert support_recall_per_round([], ["a"]) == []  # no retrieval: no recall figure


def test_report_puts_figures_beside_the_anchors_and_states_the_bm25_gap() -> None:
    from lodestar.evaluation.report import render_report

    result = {
        "kind": "retrieval",
        "dataset": "scifact",
        "split": "test",
        "num_queries": 300,
        "depth": 100,
        "collection": "eval-scifact",
        "collection_version": "v1",
        "backend": "in-process",
        "wall_s": 50.0,
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "Test CPU", "cores": 2},
        "systems": {
            "bm25": {
                "description": "BM25",
                "metrics": {"ndcg@10": 0.6500, "recall@10": 0.8, "recall@100": 0.9, "mrr@10": 0.6},
                "latency_ms": {"p50": 2.0, "p95": 3.0, "mean": 2.1},
            }
        },
        "significance": [],
    }
    page = render_report([result], expected_path=None, today="2026-01-02")
    assert "Test CPU, 2 cores" in page
    assert "| **bm25** | 0.6500 |" in page
    assert "| BM25 flat (Pyserini 2CR) | 0.6789 | 0.9253 |" in page
    assert "-0.0289 from BM25 flat (Pyserini 2CR) (0.6789): outside the ±0.02 target" in page
