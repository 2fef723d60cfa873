"""``lodestar eval report``: every results file keeps its own plot."""

from __future__ import annotations

import shutil
from pathlib import Path

from lodestar.evaluation.report import write_report

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_two_runs_on_the_same_data_get_their_own_plots(tmp_path: Path) -> None:
    # Both are 100 NQ-oracle questions: single-round methods, and the multi-round comparison.
    results = tmp_path / "results"
    results.mkdir()
    for name in ("rag-nq-oracle-100q.json", "rag-nq-oracle-100q-rounds.json"):
        shutil.copy(RESULTS / name, results / name)
    page, others = write_report(results, tmp_path / "docs" / "results.md")
    assert others == []
    images = sorted(p.name for p in (tmp_path / "docs" / "img").glob("*.png"))
    assert images == ["rag-nq-oracle-100q-rounds.png", "rag-nq-oracle-100q.png"]
    text = page.read_text()
    assert "img/rag-nq-oracle-100q.png" in text and "img/rag-nq-oracle-100q-rounds.png" in text
