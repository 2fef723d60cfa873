"""Training data for the cross-encoder from a BEIR train split: pairs, hard negatives, rewrites.

Plain functions over injected callables, so the CAR experiment (in process) and the training
job (on a worker) build identical examples without the reranker importing other services:

- ``search(query, k, retrievers) -> (doc ids, scores)``: Lodestar's first stage (RRF of dense and
  BM25 when both retrievers are named);
- ``rewrite(pairs, mode) -> rewritten queries``: the rewriter engine's cached batch rewrite.

Leakage: a pair whose relevant document is judged for a test query is never formed, test-judged
documents never serve as negatives, and :func:`check_no_leakage` re-checks the final examples.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from services.reranker.cross_encoder import (
    RankingExample,
    TextDoc,
    check_no_leakage,
    mine_hard_negatives,
)

Search = Callable[[str, int, tuple[str, ...]], tuple[list[str], list[float]]]
Progress = Callable[[int, int, str], None]
#: Hard negatives kept per pair (each training step samples from them).
NEGATIVE_POOL = 8
#: First-stage depth the negatives are mined from.
MINING_DEPTH = 30
#: Training variants, by which query each pair contributes (CAR's conditions).
CONDITIONS = ("original", "car", "query-only", "original+car", "car-ambiguous")


@dataclass
class TrainPair:
    qid: str
    query: str
    doc_id: str
    negatives: list[str] = field(default_factory=list)
    margin: float = 0.0
    """Dense top-1 minus top-2 cosine of the original query (the ambiguity predictor)."""
    rewrites: dict[str, str] = field(default_factory=dict)


def training_pairs(
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    forbidden_docs: AbstractSet[str],
    limit: int,
    seed: int,
) -> tuple[list[TrainPair], int]:
    """One pair per sampled train query (its first relevant document that no test query is
    judged on); returns the pairs and how many queries had only test-judged documents."""
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    pairs: list[TrainPair] = []
    dropped = 0
    for qid in qids:
        if len(pairs) >= limit:
            break
        allowed = sorted(d for d, rel in qrels[qid].items() if rel > 0 and d not in forbidden_docs)
        if not allowed:
            dropped += 1
            continue
        pairs.append(TrainPair(qid, queries[qid], allowed[0]))
    return pairs, dropped


def mine(
    pairs: Sequence[TrainPair],
    qrels: Mapping[str, Mapping[str, int]],
    search: Search,
    forbidden_docs: AbstractSet[str],
    progress: Progress | None = None,
) -> None:
    """Fill each pair's hard negatives (hybrid first stage, judged and test-judged documents
    out) and its dense margin."""
    for done, pair in enumerate(pairs, start=1):
        ranking, _ = search(pair.query, MINING_DEPTH, ("dense", "bm25"))
        ranking = [d for d in ranking if d not in forbidden_docs]
        pair.negatives = mine_hard_negatives(ranking, qrels[pair.qid], NEGATIVE_POOL)
        _, dense = search(pair.query, 2, ("dense",))
        pair.margin = dense[0] - dense[1] if len(dense) > 1 else 1.0
        if progress is not None:
            progress(done, len(pairs), "mine")


def low_margin(pairs: Sequence[TrainPair]) -> set[str]:
    """The ambiguity rule: dense top-1 minus top-2 cosine below the median of the set (a flat
    top means the query does not single out one document)."""
    if not pairs:
        return set()
    median = statistics.median(p.margin for p in pairs)
    return {p.qid for p in pairs if p.margin < median}


def condition_queries(
    condition: str, pair: TrainPair, ambiguous: AbstractSet[str]
) -> list[tuple[str, str]]:
    """``(query, source)`` pairs a condition trains on for one training pair."""
    if condition == "original":
        return [(pair.query, "original")]
    if condition == "car":
        return [(pair.rewrites["context"], "car")]
    if condition == "query-only":
        return [(pair.rewrites["query-only"], "query-only")]
    if condition == "original+car":
        return [(pair.query, "original"), (pair.rewrites["context"], "car")]
    if condition == "car-ambiguous":
        if pair.qid in ambiguous:
            return [(pair.rewrites["context"], "car")]
        return [(pair.query, "original")]
    raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")


def examples_for(
    condition: str,
    pairs: Sequence[TrainPair],
    text_doc: Callable[[str], TextDoc],
    *,
    forbidden_qids: AbstractSet[str],
    forbidden_docs: AbstractSet[str],
) -> list[RankingExample]:
    """The condition's training examples, checked against the test queries and documents."""
    ambiguous = low_margin(pairs)
    examples = [
        RankingExample(
            qid=pair.qid,
            query=query,
            positive=text_doc(pair.doc_id),
            negatives=tuple(text_doc(d) for d in pair.negatives),
            source=source,
        )
        for pair in pairs
        for query, source in condition_queries(condition, pair, ambiguous)
    ]
    check_no_leakage(examples, forbidden_qids=forbidden_qids, forbidden_doc_ids=forbidden_docs)
    return examples
