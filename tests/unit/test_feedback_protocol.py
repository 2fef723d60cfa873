"""The feedback experiment's protocol pieces: simulated labels, the residual collection, κ."""

from __future__ import annotations

import pytest

from lodestar.experiments.feedback import (
    agreement,
    best_capped_rule,
    best_threshold,
    cohen_kappa,
    qrels_labels,
    residual_ndcg,
    residual_qrels,
    residual_ranking,
    seeded_order,
)


def test_unjudged_documents_are_irrelevant() -> None:
    labels = qrels_labels(["a", "b", "c"], {"b": 1, "z": 2, "c": 0})
    assert labels == {"a": False, "b": True, "c": False}


def test_residual_qrels_drop_judged_documents_and_emptied_queries() -> None:
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}, "q3": {"d": 1}}
    judged = {"q1": ["a", "x"], "q2": ["c"], "q3": ["y"]}
    assert residual_qrels(qrels, judged) == {"q1": {"b": 1}, "q3": {"d": 1}}
    assert residual_ranking(["a", "x", "b", "d"], ["a", "x"]) == ["b", "d"]


def test_residual_ndcg_removes_judged_documents_from_every_ranking() -> None:
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    judged = {"q1": ["a", "x"], "q2": ["c", "y"]}  # q2 has nothing left to find
    rankings = {
        # the first ranking found a (judged); b is deep
        "first": {"q1": ["a", "x", "p", "q", "b"], "q2": ["c", "y"]},
        # the rerun puts b first among the unjudged, and a judged doc anywhere does not count
        "after": {"q1": ["x", "b", "a", "p"], "q2": ["y", "c"]},
    }
    out = residual_ndcg(rankings, qrels, judged)
    assert set(out["first"]) == set(out["after"]) == {"q1"}
    # residual first: p, q, b -> b at rank 3: DCG = 1/log2(4) = 0.5, ideal 1
    assert out["first"]["q1"] == pytest.approx(0.5)
    assert out["after"]["q1"] == pytest.approx(1.0)


def test_residual_ndcg_with_no_residual_query_is_empty() -> None:
    out = residual_ndcg({"first": {"q": ["a"]}}, {"q": {"a": 1}}, {"q": ["a"]})
    assert out == {"first": {}}


def test_cohen_kappa_known_values() -> None:
    # 2x2 table: both yes 20, a-yes b-no 5, a-no b-yes 10, both no 15 (n=50):
    # p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, κ = 0.4
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(a, [not x for x in a]) == pytest.approx(-1.0)
    # chance-level agreement: independent raters
    assert cohen_kappa([True, True, False, False], [True, False, True, False]) == 0.0
    # one class everywhere on both sides: 0/0, defined as full agreement
    assert cohen_kappa([False] * 3, [False] * 3) == 1.0
    # one rater constant, the other not: κ = 0
    assert cohen_kappa([False] * 4, [True, False, False, False]) == 0.0


def test_cohen_kappa_refuses_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError):
        cohen_kappa([True], [True, False])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


def test_agreement_precision_recall() -> None:
    predicted = [True, True, False, False, True]
    gold = [True, False, True, False, False]
    out = agreement(predicted, gold)
    assert out["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["recall"] == pytest.approx(0.5)
    assert out["n"] == 5 and out["predicted_relevant"] == 3 and out["gold_relevant"] == 2
    assert -1.0 <= out["kappa"] <= 1.0
    assert agreement([False, False], [True, False])["precision"] is None


def test_best_threshold_separates_when_it_can() -> None:
    probabilities = [0.9, 0.8, 0.3, 0.2, 0.1]
    gold = [True, True, False, False, False]
    t = best_threshold(probabilities, gold)
    assert 0.3 < t <= 0.8
    assert cohen_kappa([p >= t for p in probabilities], gold) == 1.0


def test_seeded_order_is_a_stable_permutation() -> None:
    ids = [str(i) for i in range(20)]
    first = seeded_order(ids, 0, "x")
    assert sorted(first) == sorted(ids)
    assert seeded_order(list(reversed(ids)), 0, "x") == first
    assert seeded_order(ids, 1, "x") != first


def test_a_cap_is_chosen_only_when_it_agrees_better() -> None:
    # Each query has one relevant document, scored highest, and a runner-up above every
    # threshold that separates: only "at most 1" reaches κ = 1.
    per_query = [([0.9, 0.85, 0.1], [True, False, False]), ([0.6, 0.7, 0.2], [False, True, False])]
    threshold, cap, kappa = best_capped_rule(per_query)
    assert cap == 1 and kappa == pytest.approx(1.0) and threshold <= 0.7
    # Separable by the threshold alone: no cap.
    separable = [([0.9, 0.2], [True, False]), ([0.8, 0.1], [True, False])]
    assert best_capped_rule(separable)[1] is None
