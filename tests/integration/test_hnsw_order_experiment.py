"""``lodestar experiment hnsw-order`` end to end on tiny sets: real hnswlib and faiss builds,
the JSON of every run, the Markdown report and its plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lodestar.experiments.hnsw_order import (
    LIBRARIES,
    PRESETS,
    Dataset,
    ExperimentConfig,
    Progress,
    SciFactData,
    build_index,
    run_experiment,
    run_ranking_shift,
)
from lodestar.experiments.hnsw_order_report import write_report


def test_suite_end_to_end_on_tiny_synthetic_and_npy_sets(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    npy = tmp_path / "mine.npy"
    np.save(npy, rng.standard_normal((600, 24)).astype(np.float32))
    config = ExperimentConfig(
        data=["synthetic", str(npy)],
        out=tmp_path / "out",
        data_dir=tmp_path / "data",
        seeds=2,
        ef_search=[10, 40],
        synthetic_dims=[2, 16],
        synthetic_n=300,
        synthetic_queries=40,
        synthetic_seeds=2,
        clusters=3,
        level_seeds=1,
        preset_data=[str(npy)],
        presets=["faiss", "qdrant"],
        preset_seeds=2,
    )
    payload = run_experiment(config, show_progress=False)

    saved = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(payload["runs"]))
    runs = payload["runs"]
    mine = [r for r in runs if r["dataset"] == "mine" and r["experiment"] == "order"]
    # Every library built every ordering it is meant to (faiss_batch a subset), 2 random seeds.
    assert {r["library"] for r in mine} == set(LIBRARIES)
    hnswlib_orders = {(r["ordering"], r["order_seed"]) for r in mine if r["library"] == "hnswlib"}
    assert {("random", 0), ("random", 1), ("lid_asc", 0), ("lid_desc", 0)} <= hnswlib_orders
    assert {("hubs_first", 0), ("cluster_interleaved", 0), ("stored", 0)} <= hnswlib_orders
    for run in runs:
        # The preset dataset is also searched at each preset's own ef (faiss 16, Qdrant 100).
        expected_ef = {"10", "16", "40", "100"} if run["dataset"] == "mine" else {"10", "40"}
        for by_ef in run["results"].values():
            assert set(by_ef) == expected_ef
            assert all(0.0 <= v["recall"] <= 1.0 for v in by_ef.values())
            # A wider search never finds fewer true neighbours on the same graph.
            assert by_ef["40"]["recall"] >= by_ef["10"]["recall"] - 1e-9
    # Presets: the faiss build (M 32, efC 40) is extra; Qdrant's 16/100 is the main build.
    preset_runs = [r for r in runs if r["experiment"] == "preset"]
    assert {(r["m"], r["ef_construction"]) for r in preset_runs} == {(32, 40)}
    assert len([r for r in runs if r["experiment"] == "level_seed"]) == 1
    # Synthetic sets: low intrinsic dimension gives near-perfect recall, and LID tracks m.
    lid = {d["dataset"]: d["lid"]["20"]["median"] for d in payload["datasets"]}
    assert lid["synthetic-m2"] < lid["synthetic-m16"]
    m2 = [r for r in runs if r["dataset"] == "synthetic-m2"]
    assert min(r["results"]["heldout"]["40"]["recall"] for r in m2) > 0.95

    report = write_report(payload, tmp_path / "out")
    text = report.read_text()
    assert "## Verdict: what reproduces" in text
    assert "Order moves recall" in text and "Recall falls with intrinsic dimensionality" in text
    for png in ("recall_vs_ordering_ef10.png", "recall_vs_intrinsic_dimension.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
        assert f"]({png})" in text


def test_order_is_the_only_change_for_seeded_builds() -> None:
    """Same order and seeds give the same graph's answers; faiss_seq levels are tied to points."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    rows = rng.permutation(500)
    for library in LIBRARIES:
        first = build_index(library, vectors, rows, m=8, ef_construction=40, level_seed=1)
        second = build_index(library, vectors, rows, m=8, ef_construction=40, level_seed=1)
        found_first, _, _ = first.search(queries, 10, 10)
        found_second, _, _ = second.search(queries, 10, 10)
        assert np.array_equal(found_first, found_second), library
        assert found_first.min() >= 0 and found_first.max() < 500


@pytest.mark.slow
def test_ranking_shift_on_a_real_scifact_slice(tmp_path: Path) -> None:
    """nDCG@10 of embedding variants under exact search and presets, on 15 test claims and 60
    real abstracts (the relevant ones plus distractors; title and first 40 words, to keep the
    MiniLM embedding to seconds on two cores)."""
    from shared.datasets import load_scifact
    from shared.models import get_embedder
    from tests.conftest import make_settings

    beir = load_scifact()
    qrels = dict(sorted(beir.qrels["test"].items())[:15])
    relevant = {doc for docs in qrels.values() for doc in docs}
    corpus = [d for d in beir.corpus if d.id in relevant]
    corpus += [d for d in beir.corpus if d.id not in relevant][: 60 - len(corpus)]
    embedder = get_embedder(make_settings(tmp_path))
    vectors = embedder.encode([f"{d.title} {' '.join(d.text.split()[:40])}" for d in corpus])
    query_ids = sorted(qrels)
    data = SciFactData(
        dataset=Dataset(
            "scifact",
            vectors,
            {"claims": embedder.encode([beir.queries[q] for q in query_ids])},
        ),
        passage_doc_ids=[d.id for d in corpus],
        query_ids=query_ids,
        test_query_ids=query_ids,
        test_qrels=qrels,
    )
    config = ExperimentConfig(
        data=[],
        out=tmp_path,
        data_dir=tmp_path,
        presets=["hnswlib", "pgvector"],
        ranking_variants=["full", "pca32", "trunc96"],
    )
    ranking = run_ranking_shift(data, config, Progress(False))
    assert set(ranking["ndcg@10"]) == {"full", "pca32", "trunc96"}
    for scores in ranking["ndcg@10"].values():
        assert set(scores) == {"exact", "hnswlib", "pgvector"}
        assert all(0.0 <= s <= 1.0 for s in scores.values())
    # The relevant abstracts are in this small corpus: full MiniLM finds many of them.
    assert ranking["ndcg@10"]["full"]["exact"] > 0.4
    assert sorted(ranking["rank"]["exact"].values()) == [1, 2, 3]
    assert all(shift >= 0 for shift in ranking["max_rank_shift"].values())
    assert {p.name for p in PRESETS} >= set(ranking["rank"]) - {"exact"}
