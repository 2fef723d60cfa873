"""Metrics against values worked out by hand (the arithmetic is written out in each test)."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from shared.metrics import (
    evaluate_run,
    exact_match,
    f1,
    normalize_answer,
    paired_bootstrap,
    paired_randomization,
    paired_t_test,
    rank_documents,
)

# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def test_ndcg_recall_mrr_with_graded_relevance_by_hand() -> None:
    qrels = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1}}
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d5": 0.7, "d2": 0.6}}  # d4 (relevant) not retrieved

    # trec_eval nDCG: gain = graded relevance, discount = log2(rank + 1).
    # Ranking: d3 (rel 0), d1 (rel 2), d5 (unjudged = 0), d2 (rel 1).
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4) + 1 / math.log2(5)
    # Ideal: all judged relevances sorted: 2, 1, 1, 0.
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 0 / math.log2(5)
    assert dcg == pytest.approx(1.6925361, abs=1e-6)
    assert idcg == pytest.approx(3.1309298, abs=1e-6)

    result = evaluate_run(run, qrels)
    scores = result.per_query["q1"]
    assert scores["ndcg@10"] == pytest.approx(dcg / idcg)  # 0.54058...
    # Relevant (rel >= 1): d1, d2, d4; retrieved: d1, d2.
    assert scores["recall@10"] == pytest.approx(2 / 3)
    assert scores["recall@100"] == pytest.approx(2 / 3)
    # First relevant document (d1) is at rank 2.
    assert scores["mrr@10"] == pytest.approx(1 / 2)
    assert result.mean == pytest.approx(scores)
    assert result.num_queries == 1
    assert result.missing_queries == [] and result.ignored_queries == []


def test_perfect_ranking_scores_one() -> None:
    qrels = {"q": {"a": 3, "b": 1}}
    result = evaluate_run({"q": {"a": 2.0, "b": 1.0, "c": 0.5}}, qrels)
    assert result.per_query["q"] == {
        "ndcg@10": pytest.approx(1.0),
        "recall@10": 1.0,
        "recall@100": 1.0,
        "mrr@10": 1.0,
    }
    # Swapping the two relevant documents: DCG = 1/1 + 3/log2(3); IDCG = 3/1 + 1/log2(3).
    swapped = evaluate_run({"q": {"a": 1.0, "b": 2.0}}, qrels).per_query["q"]
    assert swapped["ndcg@10"] == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))


def test_ties_are_broken_by_doc_id_descending_like_trec_eval() -> None:
    assert rank_documents({"a": 1.0, "b": 1.0, "c": 0.5, "z": 2.0}) == ["z", "b", "a", "c"]
    # "a" and "b" tie; trec_eval puts "b" first, so "a" is at rank 2.
    result = evaluate_run({"q": {"a": 1.0, "b": 1.0}}, {"q": {"a": 1}})
    assert result.per_query["q"]["mrr@10"] == pytest.approx(0.5)
    assert result.per_query["q"]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    # The same tie-break decides who survives the MRR@k truncation: with "z" relevant and tied
    # with nine others at the top, "z" sorts first among them and stays in the top 1.
    run = {"q": {f"d{i}": 1.0 for i in range(9)} | {"z": 1.0}}
    assert evaluate_run(run, {"q": {"z": 1}}, mrr_cutoffs=(1,)).per_query["q"]["mrr@1"] == 1.0
    assert evaluate_run(run, {"q": {"d0": 1}}, mrr_cutoffs=(9,)).per_query["q"]["mrr@9"] == 0.0


def test_mrr_cutoff_truncates_before_recip_rank() -> None:
    # The only relevant document is at rank 11.
    run = {"q": {f"d{i:02d}": 100.0 - i for i in range(20)}}
    qrels = {"q": {"d10": 1}}
    scores = evaluate_run(run, qrels, mrr_cutoffs=(10, 11, 20)).per_query["q"]
    assert scores["mrr@10"] == 0.0
    assert scores["mrr@11"] == pytest.approx(1 / 11)
    assert scores["mrr@20"] == pytest.approx(1 / 11)
    assert scores["recall@10"] == 0.0
    assert scores["recall@100"] == 1.0
    assert scores["ndcg@10"] == 0.0


def test_missing_and_ignored_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q4": {"c": 1}}
    run = {
        "q1": {"a": 1.0},  # perfect
        "q3": {"x": 1.0},  # no qrels: ignored
        "q4": {},  # no documents: same as missing
    }
    result = evaluate_run(run, qrels)
    assert result.num_queries == 3
    assert result.missing_queries == ["q2", "q4"]
    assert result.ignored_queries == ["q3"]
    assert set(result.per_query) == {"q1", "q2", "q4"}
    assert result.per_query["q2"] == dict.fromkeys(
        ["ndcg@10", "recall@10", "recall@100", "mrr@10"], 0.0
    )
    # The mean divides by all 3 judged queries (trec_eval -c), not by the 1 that was run.
    assert result.mean["ndcg@10"] == pytest.approx(1 / 3)
    assert result.mean["mrr@10"] == pytest.approx(1 / 3)
    assert result.values("recall@10") == [1.0, 0.0, 0.0]


def test_empty_run_scores_zero_and_custom_cutoffs() -> None:
    result = evaluate_run({}, {"q": {"a": 1}}, ndcg_cutoffs=(5,), recall_cutoffs=(1,))
    assert result.mean == {"ndcg@5": 0.0, "recall@1": 0.0, "mrr@10": 0.0}


def test_evaluate_run_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="qrels is empty"):
        evaluate_run({"q": {"a": 1.0}}, {})
    with pytest.raises(ValueError, match="cutoffs"):
        evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 1}}, mrr_cutoffs=(0,))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_run({"q": {"a": float("nan")}}, {"q": {"a": 1}})


# --------------------------------------------------------------------------------------------
# QA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat", "cat"),
        ("  an   apple,  a pear! ", "apple pear"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("don't stop", "dont stop"),  # SQuAD deletes punctuation
        ("“Röntgen”", "röntgen"),  # curly quotes are punctuation; accents are kept
        ("1954–1959", "19541959"),  # en dash deleted like "-"
        ("¿Qué?", "qué"),
        ("ＡＢＣ\u00a0Corp", "abc corp"),  # full-width letters and no-break space (NFKC)
        ("$5.00", "500"),
        ("", ""),
        ("The, a; an.", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert exact_match("paris", ["London", "Paris!"]) == 1.0  # any gold counts
    assert exact_match("", ["Paris"]) == 0.0
    assert exact_match("“Paris”", ['"Paris"']) == 1.0
    assert exact_match("the", ["a"]) == 1.0  # both normalise to the empty answer


def test_f1_by_hand() -> None:
    # pred tokens: quick brown fox; gold tokens: quick fox jumps; overlap 2.
    # precision = 2/3, recall = 2/3, F1 = 2 * (2/3 * 2/3) / (4/3) = 2/3.
    assert f1("The quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    # "barack obama" vs "obama": overlap 1, P = 1/2, R = 1, F1 = 2 * (1/2) / (3/2) = 2/3.
    assert f1("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    # Max over golds: 0 for "paris", 2/3 for "obama".
    assert f1("Barack Obama", ["Paris", "Obama"]) == pytest.approx(2 / 3)
    # Repeated tokens count by multiplicity: "x x y" vs "x y y": common = {x: 1, y: 1} = 2,
    # P = R = 2/3 (a set-based overlap would give 1.0).
    assert f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert f1("Paris", ["paris"]) == 1.0


def test_f1_empty_prediction_and_empty_gold() -> None:
    assert f1("", ["Paris"]) == 0.0
    assert f1("Paris", ["the"]) == 0.0  # gold normalises to nothing
    assert f1("", ["the"]) == 1.0  # both empty: agree (SQuAD 2.0 convention)
    assert f1("...", [""]) == 1.0


def test_qa_metrics_reject_bad_golds() -> None:
    with pytest.raises(ValueError, match="golds is empty"):
        exact_match("x", [])
    with pytest.raises(ValueError, match="golds is empty"):
        f1("x", [])
    with pytest.raises(TypeError, match="list of strings"):
        f1("x", "x")


# --------------------------------------------------------------------------------------------
# Significance
# --------------------------------------------------------------------------------------------


def test_paired_t_test_by_hand() -> None:
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 1.0, 1.0]
    # d = [1, 0, 2, 3]; mean 1.5; sample sd = sqrt((0.25 + 2.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    # t = 1.5 / (sqrt(5/3) / sqrt(4)) = 2.3238; df = 3; two-sided p = 2 * P(T_3 > t).
    t = 1.5 / (math.sqrt(5 / 3) / 2)
    assert t == pytest.approx(2.32379, abs=1e-5)
    expected_p = 2 * stats.t.sf(t, df=3)
    result = paired_t_test(a, b)
    assert result.mean_difference == pytest.approx(1.5)
    assert result.p_value == pytest.approx(expected_p)
    assert 0.10 < result.p_value < 0.11
    assert result.n == 4
    assert paired_t_test(b, a).mean_difference == pytest.approx(-1.5)


def test_paired_t_test_constant_differences() -> None:
    assert paired_t_test([0.5, 0.7, 0.1], [0.5, 0.7, 0.1]).p_value == 1.0
    constant = paired_t_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert constant.p_value == 0.0 and constant.mean_difference == pytest.approx(0.5)


def test_paired_bootstrap() -> None:
    b = [0.1 * (i % 7) for i in range(39)]  # 39: the +-0.05 noise below cancels exactly
    better = [x + 0.2 + 0.05 * ((i % 3) - 1) for i, x in enumerate(b)]
    result = paired_bootstrap(better, b, n=2000, seed=0)
    assert result.mean_difference == pytest.approx(0.2)
    assert result.p_value == pytest.approx(1 / 2001)  # no resample reaches 0.2 under H0
    # Noise around zero: not significant.
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(b)]
    assert paired_bootstrap(noisy, b, n=2000, seed=0).p_value > 0.5
    # Identical systems: every resample is at least as extreme as 0.
    assert paired_bootstrap(b, b, n=500).p_value == 1.0


def test_paired_bootstrap_is_deterministic_and_symmetric() -> None:
    a = [0.5, 0.6, 0.7, 0.9, 0.3, 0.2, 0.8]
    b = [0.4, 0.5, 0.7, 0.6, 0.3, 0.3, 0.6]
    first = paired_bootstrap(a, b, n=3000, seed=7)
    assert first == paired_bootstrap(a, b, n=3000, seed=7)
    swapped = paired_bootstrap(b, a, n=3000, seed=7)
    assert swapped.p_value == pytest.approx(first.p_value)
    assert swapped.mean_difference == pytest.approx(-first.mean_difference)
    assert 0.0 < first.p_value < 1.0
    # Agrees roughly with the t-test on the same data.
    assert first.p_value == pytest.approx(paired_t_test(a, b).p_value, abs=0.06)


def test_significance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_t_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        paired_t_test([1.0, float("inf")], [0.0, 0.0])
    with pytest.raises(ValueError, match="n must be"):
        paired_bootstrap([1.0, 2.0], [0.0, 0.0], n=0)


def test_paired_randomization_exact_and_sampled() -> None:
    # Five queries all better: only the observed assignment reaches the sum, p = 2^-5.
    assert paired_randomization([0.6] * 5, [0.5] * 5).p_value == pytest.approx(1 / 32)
    # One-sided: the same differences the other way round are as unlikely as can be.
    assert paired_randomization([0.5] * 5, [0.6] * 5).p_value == pytest.approx(1.0)
    # Ties carry no sign; all ties is no evidence.
    assert paired_randomization([0.6, 0.5, 0.6], [0.5, 0.5, 0.5]).p_value == pytest.approx(1 / 4)
    assert paired_randomization([0.5, 0.5], [0.5, 0.5]).p_value == 1.0
    # Beyond 16 non-zero differences it samples: 20 all better, none of 999 draws reach it.
    sampled = paired_randomization([1.0] * 20, [0.0] * 20, n=999, seed=3)
    assert sampled.p_value == pytest.approx(1 / 1000) and sampled.n == 20
    mixed = paired_randomization([0.0, 1.0] * 10, [0.5] * 20, n=2000, seed=3)
    assert 0.4 < mixed.p_value < 0.65  # mean difference 0: about half reach it
