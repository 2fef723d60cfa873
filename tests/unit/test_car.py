"""CAR's training-data rules and the experiment's ranking arithmetic (no model, no index)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from lodestar.experiments.car import fuse, rank_run, rerank_top
from services.reranker.cross_encoder import LeakageError, TextDoc
from services.reranker.training_data import (
    PreparedPairs,
    TrainPair,
    condition_queries,
    examples_for,
    low_margin,
    mine,
    prepare_pairs,
    rewrite_modes,
    synthetic_pairs,
    training_pairs,
)

QUERIES = {"q1": "claim one", "q2": "claim two", "q3": "claim three"}
QRELS = {"q1": {"d1": 1, "d9": 1}, "q2": {"test-doc": 1}, "q3": {"d3": 1}}


def test_training_pairs_never_use_test_judged_documents() -> None:
    pairs, dropped = training_pairs(QUERIES, QRELS, {"test-doc", "d1"}, limit=10, seed=0)
    assert dropped == 1  # q2's only relevant document is judged for a test query
    assert {(p.qid, p.doc_id) for p in pairs} == {("q1", "d9"), ("q3", "d3")}
    limited, _ = training_pairs(QUERIES, QRELS, set(), limit=1, seed=0)
    assert len(limited) == 1


def test_mining_skips_judged_and_forbidden_documents_and_records_the_margin() -> None:
    pairs = [TrainPair("q1", "claim one", "d9")]

    def search(query: str, k: int, retrievers: tuple[str, ...]) -> tuple[list[str], list[float]]:
        if retrievers == ("dense",):
            return ["d1", "x"], [0.9, 0.6]
        return ["d1", "test-doc", "n1", "d9", "n2"], [5, 4, 3, 2, 1]

    mine(pairs, QRELS, search, {"test-doc"})
    assert pairs[0].negatives == ["n1", "n2"]
    assert pairs[0].margin == pytest.approx(0.3)


def test_conditions_and_the_ambiguity_rule() -> None:
    pairs = [
        TrainPair(f"q{i}", f"query {i}", f"d{i}", ["n"], margin=m, rewrites={"context": f"car {i}"})
        for i, m in enumerate([0.05, 0.1, 0.3, 0.4])
    ]
    ambiguous = low_margin(pairs)
    assert ambiguous == {"q0", "q1"}  # below the median margin
    assert condition_queries("car-ambiguous", pairs[0], ambiguous) == [("car 0", "car")]
    assert condition_queries("car-ambiguous", pairs[3], ambiguous) == [("query 3", "original")]
    assert condition_queries("original+car", pairs[2], ambiguous) == [
        ("query 2", "original"),
        ("car 2", "car"),
    ]
    with pytest.raises(ValueError, match="unknown condition"):
        condition_queries("drift", pairs[0], ambiguous)


def test_examples_are_checked_against_test_documents() -> None:
    pairs = [TrainPair("q1", "claim", "d1", ["n1", "test-doc"])]

    def doc(doc_id: str) -> TextDoc:
        return TextDoc(doc_id, "", doc_id)

    with pytest.raises(LeakageError):
        examples_for("original", pairs, doc, forbidden_qids=set(), forbidden_docs={"test-doc"})
    made = examples_for("original", pairs, doc, forbidden_qids=set(), forbidden_docs=set())
    assert made[0].negatives == (doc("n1"), doc("test-doc")) and made[0].source == "original"


def test_reranking_keeps_the_tail_and_fusion_mixes_both_orders() -> None:
    ranking = ["a", "b", "c", "d"]
    assert rerank_top(ranking, {"a": 0.1, "b": 0.9, "c": 0.5}, depth=3) == ["b", "c", "a", "d"]
    assert rank_run(["b", "a"]) == {"b": 2.0, "a": 1.0}
    fused = fuse(["a", "b", "c"], ["c", "b", "a"])
    # 1/61 + 1/63 beats 2/62; the tie between a and c goes to the re-ranked order.
    assert fused == ["c", "a", "b"]


def test_only_the_rewrites_the_conditions_train_on_are_generated() -> None:
    assert rewrite_modes(["original"]) == ()
    assert rewrite_modes(["original", "car", "original+car"]) == ("context",)
    assert rewrite_modes(["car-ambiguous"]) == ("context",)
    assert rewrite_modes(["query-only"]) == ("query-only",)
    assert rewrite_modes(["original", "car", "query-only"]) == ("context", "query-only")
    assert rewrite_modes(["original+synthetic"]) == ()
    assert rewrite_modes(["car+synthetic"]) == ("context",)


def test_synthetic_pairs_feed_only_the_synthetic_conditions() -> None:
    qrels: dict[str, dict[str, int]] = {"q1": {"d1": 1}}
    made = synthetic_pairs([("syn-d7", "what does d7 say", "d7")], qrels)
    assert qrels["syn-d7"] == {"d7": 1}  # its own document is never mined as a negative
    real = TrainPair("q1", "claim one", "d1", rewrites={"context": "car one"})
    syn = made[0]
    syn.rewrites["context"] = "car seven"
    assert condition_queries("car", syn, set()) == []
    assert condition_queries("original+synthetic", syn, set()) == [
        ("what does d7 say", "synthetic")
    ]
    assert condition_queries("car+synthetic", syn, set()) == [("car seven", "synthetic-car")]
    assert condition_queries("car+synthetic", real, set()) == [("car one", "car")]
    assert condition_queries("original+synthetic", real, set()) == [("claim one", "original")]
    # The ambiguity median is the judged queries' alone.
    real.margin, syn.margin = 0.5, 0.0
    assert low_margin([real, syn]) == set()
    with pytest.raises(ValueError, match="collides"):
        synthetic_pairs([("q1", "x", "d1")], qrels)


def test_prepare_pairs_adds_synthetic_pairs_and_rewrites_only_what_the_conditions_use() -> None:
    rewritten: list[tuple[str, tuple[str, ...]]] = []

    def search(query: str, k: int, retrievers: tuple[str, ...]) -> tuple[list[str], list[float]]:
        return ["d1", "d3", "d7", "n1", "n2"][:k], [5.0, 4.0, 3.0, 2.0, 1.0][:k]

    def rewrite(pairs: Sequence[TrainPair], mode: str, progress: object) -> list[str]:
        rewritten.append((mode, tuple(p.qid for p in pairs)))
        return [f"{mode}: {p.query}" for p in pairs]

    def synthesize(n: int, progress: object) -> list[tuple[str, str, str]]:
        return [("syn-d7", "what does d7 say", "d7")][:n]

    def prepare(*conditions: str) -> PreparedPairs:
        return prepare_pairs(
            QUERIES, QRELS, {"test-doc"}, conditions=conditions, limit=10, seed=0,
            search=search, rewrite=rewrite, synthesize=synthesize, synthetic=5,
        )  # fmt: skip

    plain = prepare("car")
    assert plain.synthetic_requested == 0 and not any(p.synthetic for p in plain.pairs)
    assert [(mode, sorted(qids)) for mode, qids in rewritten] == [("context", ["q1", "q3"])]
    rewritten.clear()
    both = prepare("car+synthetic", "query-only")
    syn = next(p for p in both.pairs if p.synthetic)
    assert syn.doc_id == "d7" and "d7" not in syn.negatives
    assert syn.rewrites == {"context": "context: what does d7 say"}
    assert {mode: len(qids) for mode, qids in rewritten} == {"context": 3, "query-only": 2}
    assert QRELS == {"q1": {"d1": 1, "d9": 1}, "q2": {"test-doc": 1}, "q3": {"d3": 1}}
