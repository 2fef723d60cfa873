"""The DSI++ protocol's data split: D0 is half, the later corpora are disjoint, and no
evaluation question was ever a training question."""

from __future__ import annotations

from lodestar.experiments.dsi_protocol import ProtocolConfig, split_corpus


def test_split_gives_half_to_d0_and_holds_out_every_evaluation_question() -> None:
    splits = split_corpus(ProtocolConfig(docs=120, corpora=5, seed=3))
    assert [len(s.docs) for s in splits] == [60, 12, 12, 12, 12, 12]
    ids = [d.id for s in splits for d in s.docs]
    assert len(set(ids)) == len(ids) == 120, "corpora are disjoint"
    trained = {q for s in splits for qs in s.train_queries.values() for q in qs}
    evaluated = {q for s in splits for q, _ in s.eval_queries}
    assert trained and evaluated and not trained & evaluated
    assert all(not s.train_queries for s in splits[1:]), "new corpora have no real queries"
    for split in splits:
        doc_ids = {d.id for d in split.docs}
        assert {doc_id for _, doc_id in split.eval_queries} <= doc_ids
        assert split.eval_queries, "every corpus is evaluated"
    # Same seed, same split: runs are reproducible.
    again = split_corpus(ProtocolConfig(docs=120, corpora=5, seed=3))
    assert [d.id for s in again for d in s.docs] == ids
