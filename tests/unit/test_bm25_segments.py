"""Segmented BM25 keeps global statistics: its scores equal a from-scratch bm25s index over the
live passages, however the passages are split into segments and whichever rows are deleted."""

from __future__ import annotations

import itertools
from pathlib import Path

import bm25s
import numpy as np
import pytest
import Stemmer

from services.index.bm25seg import SegmentedBM25, TermStats, tokenize
from services.index.engine import BM25_B, BM25_K1
from shared.datasets import load_wikipedia_summaries

QUERIES = [
    "Who painted the Mona Lisa?",
    "tower in paris",
    "history of the jewish people",
    "music music band",  # a repeated query term counts twice, as in bm25s
    "the of and",  # stop words only
    "zzqxv",  # unknown
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [f"{d.title} {d.text}".strip() for d in load_wikipedia_summaries()[:500]]


def _from_scratch(texts: list[str], query: str) -> np.ndarray:
    retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B)
    retriever.index(
        bm25s.tokenize(
            texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False
        ),
        show_progress=False,
    )
    ids = retriever.get_tokens_ids(tokenize([query])[0])
    if not ids:
        return np.zeros(len(texts), dtype=np.float32)
    return np.asarray(retriever.get_scores_from_ids(ids), dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_a_from_scratch_index_of_the_live_passages(
    texts: list[str], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(texts)), size=3, replace=False))
    bounds = [0, *cuts.tolist(), len(texts)]
    segments = [TermStats.build(texts[a:b]) for a, b in itertools.pairwise(bounds)]
    live = [rng.random(s.n_rows) > 0.15 for s in segments]  # tombstones in every segment
    index = SegmentedBM25(segments, live, k1=BM25_K1, b=BM25_B)
    alive = np.concatenate(live)
    live_texts = [t for t, ok in zip(texts, alive, strict=True) if ok]
    assert index.n_live == len(live_texts)
    for query in QUERIES:
        got = index.scores(tokenize([query])[0])
        assert not got[~alive].any(), "a deleted row scored"
        np.testing.assert_allclose(
            got[alive], _from_scratch(live_texts, query), rtol=1e-5, atol=1e-6, err_msg=query
        )


def test_one_segment_without_tombstones_is_plain_bm25(texts: list[str]) -> None:
    index = SegmentedBM25([TermStats.build(texts)], [np.ones(len(texts), bool)])
    got = index.scores(tokenize([QUERIES[0]])[0])
    np.testing.assert_allclose(got, _from_scratch(texts, QUERIES[0]), rtol=1e-5, atol=1e-6)


def test_segments_survive_save_and_load(texts: list[str], tmp_path: Path) -> None:
    stats = TermStats.build(texts[:50])
    stats.save(tmp_path / "seg")
    loaded = TermStats.load(tmp_path / "seg")
    assert loaded.vocab == stats.vocab
    for name in ("indptr", "rows", "tf", "doc_len"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))


def test_mismatched_masks_are_refused(texts: list[str]) -> None:
    stats = TermStats.build(texts[:10])
    with pytest.raises(ValueError):
        SegmentedBM25([stats], [np.ones(9, bool)])
    with pytest.raises(ValueError):
        SegmentedBM25([stats], [])
