"""The DSI++ protocol's data split: D0 is half, the later corpora are disjoint, and no
evaluation question was ever a training question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lodestar.experiments.dsi_protocol import ProtocolConfig, _load_pseudo_queries, split_corpus


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


def test_a_larger_run_extends_a_smaller_one_so_its_pseudo_queries_can_be_reused(
    tmp_path: Path,
) -> None:
    """What ``--reuse-pseudo-queries`` relies on: with the same seed the smaller run's documents
    are a subset of the larger run's and D0's first real pairs (the LM's demonstrations) are the
    same; a file from another generator or prompt is refused."""
    small = split_corpus(ProtocolConfig(docs=60, seed=0))
    large = split_corpus(ProtocolConfig(docs=200, seed=0))
    small_ids = {d.id for s in small for d in s.docs}
    assert small_ids <= {d.id for s in large for d in s.docs}
    assert list(small[0].train_queries.items())[:3] == list(large[0].train_queries.items())[:3]

    config = ProtocolConfig(docs=200, seed=0, pseudo_per_doc=1)
    saved = {
        "query_generator": "lm",
        "demonstrations": config.demonstrations,
        "per_doc": 1,
        "queries": {doc_id: [f"q {doc_id}"] for doc_id in small_ids},
    }
    path = tmp_path / "pseudo_queries.json"
    path.write_text(json.dumps(saved))
    docs = [d for s in large for d in s.docs]
    reused = _load_pseudo_queries(path, docs, config)
    assert set(reused) == small_ids and reused[next(iter(small_ids))][0].startswith("q ")

    for field, value in (("query_generator", "t5"), ("demonstrations", 2), ("per_doc", 2)):
        path.write_text(json.dumps({**saved, field: value}))
        with pytest.raises(SystemExit):
            _load_pseudo_queries(path, docs, config)
