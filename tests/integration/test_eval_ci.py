"""The CI rows of ``benchmarks/expected.yaml``, measured for real (SciFact retrieval, a small
NQ-oracle RAG subset): every figure must stay within its tolerance.

Slow: the first run builds the ``eval-scifact`` and ``eval-nq-oracle`` collections under the data
dir (several minutes on two cores; cached afterwards) and runs SmolLM2 on the RAG subset.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lodestar.evaluation.expected import (
    default_evaluator,
    format_check,
    load_expected,
    run_check,
    select_rows,
)
from shared.settings import get_settings

pytestmark = [pytest.mark.slow, pytest.mark.eval]


def test_ci_rows_of_the_expected_figures_pass(tmp_path: Path) -> None:
    rows = select_rows(load_expected(), ci_only=True)
    assert rows, "benchmarks/expected.yaml has no ci rows"
    report = run_check(
        rows, default_evaluator(get_settings(), show_progress=False), out_dir=tmp_path
    )
    print(format_check(report.outcomes))
    assert len(report.outcomes) == sum(len(row.metrics) for row in rows)
    assert report.passed, format_check(report.outcomes)
    # The run wrote one results document per group, with per-query figures for every system.
    retrieval = report.results[("retrieval", "scifact", "test", None)]
    assert retrieval["num_queries"] == 300
    for system in ("dense", "bm25", "rrf"):
        assert len(retrieval["per_query"][system]) == 300
    assert (tmp_path / "retrieval-scifact-test.json").is_file()
