"""``lodestar bench ingest`` end to end on a few real Wikipedia documents and the real MiniLM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lodestar.bench.ingest import cmd_bench_ingest
from shared.settings import get_settings


def test_ingest_bench_compares_ingestion_with_raw_encoding(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    args = argparse.Namespace(source="wiki", documents=12, batch=5, out=str(out))
    assert cmd_bench_ingest(args, get_settings()) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["documents"] == 12
    assert report["meta"]["passages"] >= 12
    paths = [row["path"] for row in report["results"]]
    assert paths == [
        "raw sentence-transformers encode",
        "ingest, one job",
        "ingest, writes of 5 documents",
    ]
    for row in report["results"]:
        assert row["seconds"] > 0
        assert row["passages_per_s"] > 0
        assert row["ratio"] > 0
        assert row["cpu_seconds"] > 0
        assert row["cpu_ratio"] > 0
    # Three writes of 5, 5 and 2 documents into one collection, every passage embedded once.
    writes = report["writes"]
    assert [w["documents"] for w in writes] == [5, 5, 2]
    assert [w["documents_before"] for w in writes] == [0, 5, 10]
    assert sum(w["passages"] for w in writes) == report["meta"]["passages"]
