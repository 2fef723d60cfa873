"""SEAL's scoring against hand-computed examples: the weight formula, repeated n-grams, overlaps
and the coverage penalty, frequent n-grams (score but never propose), unigram add-back."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.fmindex.fm import FMIndex
from services.fmindex.scoring import (
    Key,
    KeyMatcher,
    ScoringConfig,
    build_keys,
    coverage_coefficient,
    full_score,
    log_odds_weight,
    ngram_weight,
    score_documents,
)

CONFIG = ScoringConfig(best_unigrams=0)


def test_weight_is_the_clipped_log_odds_ratio_squared() -> None:
    s, count, total = math.log(0.5), 3, 1000
    prior = (3 + 5.0) / (1000 + 5.0)
    expected = math.log(0.5 * (1 - prior) / (prior * (1 - 0.5)))
    assert log_odds_weight(s, count, total, 5.0) == pytest.approx(expected)
    assert ngram_weight(s, count, total, CONFIG) == pytest.approx(expected**2)
    # An n-gram the query makes less likely than the corpus does weighs nothing (clip at 0).
    assert ngram_weight(math.log(1e-6), 900, 1000, CONFIG) == 0.0
    # Smoothing keeps a never-seen n-gram finite; s = 0 is capped below log(1) = 0.
    assert math.isfinite(ngram_weight(0.0, 0, 1000, CONFIG))


def test_coverage_coefficient() -> None:
    assert coverage_coefficient((1, 2), set(), 0.8) == pytest.approx(1.0)
    assert coverage_coefficient((1, 2), {1}, 0.8) == pytest.approx(0.2 + 0.8 * 0.5)
    assert coverage_coefficient((1, 2), {1, 2}, 0.8) == pytest.approx(0.2)


def key(tokens: tuple[int, ...], weight: float, count: int = 1, kind: str = "body") -> Key:
    return Key(tokens, -1.0, count, weight, kind)


def test_full_scoring_counts_a_repeated_ngram_once_and_penalises_overlap() -> None:
    # doc: 5 6 7 5 6 8   keys: (5,6) w=4 (occurs twice), (6,7) w=3 (overlaps the first (5,6)),
    # (7,5) w=2 (free positions 2..3), (8,) w=1.
    keys = [key((5, 6), 4.0), key((6, 7), 3.0), key((7, 5), 2.0), key((8,), 1.0)]
    doc = np.array([5, 6, 7, 5, 6, 8])
    scored = full_score(0, doc, keys, KeyMatcher(keys), {}, CONFIG)
    contributions = {m.key.tokens: m.contribution for m in scored.matches}
    # (5,6) once: 4.0. (6,7) overlaps positions 1 -> its only occurrence is blocked.
    # (7,5) at 2..3: tokens {7,5}, 5 covered -> 2 * (0.2 + 0.8 * 1/2) = 1.2.
    # (8,): fresh -> 1.0.
    assert contributions == {(5, 6): 4.0, (7, 5): pytest.approx(1.2), (8,): 1.0}
    assert scored.score == pytest.approx(4.0 + 1.2 + 1.0)


def test_unigram_add_back_uses_free_tokens_only_with_the_penalty() -> None:
    keys = [key((5, 6), 4.0)]
    unigrams = {6: key((6,), 0.5, kind="unigram"), 9: key((9,), 0.7, kind="unigram")}
    doc = np.array([5, 6, 9, 6])
    scored = full_score(0, doc, keys, KeyMatcher(keys), unigrams, CONFIG)
    # free positions: 2 (token 9) and 3 (token 6, already covered by (5,6)).
    added = {m.key.tokens: m.contribution for m in scored.unigrams}
    assert added == {(9,): pytest.approx(0.7), (6,): pytest.approx(0.5 * 0.2)}
    assert scored.score == pytest.approx(4.0 + 0.7 + 0.1)


def test_frequent_ngrams_score_but_do_not_propose_candidates() -> None:
    # docs are separated by 0; token 1 is everywhere (frequent), (2, 3) only in doc 1.
    docs = [[1, 4, 1], [1, 2, 3, 1], [1, 5, 1]]
    stream = [0]
    starts = []
    for doc in docs:
        starts.append(len(stream))
        stream += [*doc, 0]
    starts.append(len(stream))
    fm, _ = FMIndex.build(np.asarray(stream))
    config = ScoringConfig(max_hits=2, best_unigrams=0, unigram_scores=False)
    starts_arr = np.asarray(starts)

    def doc_of(positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(starts_arr, positions, side="right") - 1

    def doc_tokens(doc: int) -> np.ndarray:
        return np.asarray(stream[starts[doc] - 1 : starts[doc + 1] - 1])

    keys, _ = build_keys(
        [((1,), math.log(0.9), "body"), ((2, 3), math.log(0.5), "body")], fm, config
    )
    assert {k.tokens: k.count for k in keys} == {(1,): 6, (2, 3): 1}
    ranked = score_documents(keys, {}, fm, doc_of, doc_tokens, config, k=10)
    # Only doc 1 is a candidate (token 1 occurs 6 > max_hits times: it only scores).
    assert [d.doc for d in ranked] == [1]
    by_key = {m.key.tokens: m.contribution for m in ranked[0].matches}
    w_rare = ngram_weight(math.log(0.5), 1, len(stream), config)
    w_freq = ngram_weight(math.log(0.9), 6, len(stream), config)
    assert by_key == {(2, 3): pytest.approx(w_rare), (1,): pytest.approx(w_freq)}
    assert ranked[0].score == pytest.approx(w_rare + w_freq)


def test_duplicate_ngrams_keep_their_best_logprob_and_absent_ones_are_dropped() -> None:
    fm, _ = FMIndex.build(np.asarray([0, 2, 3, 0, 2, 4, 0]))
    keys, _ = build_keys(
        [((2, 3), math.log(0.6), "body"), ((2, 3), math.log(0.9), "body"), ((3, 2), -0.1, "body")],
        fm,
        CONFIG,
    )
    assert [(k.tokens, round(k.logprob, 4)) for k in keys] == [((2, 3), round(math.log(0.9), 4))]
