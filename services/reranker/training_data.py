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
#: ``rewrite(pairs, mode, progress) -> one rewritten query per pair``.
Rewrite = Callable[[Sequence["TrainPair"], str, Progress | None], list[str]]
#: ``synthesize(n, progress) -> (qid, query, doc id)`` InPars queries, at most ``n``.
Synthesize = Callable[[int, Progress | None], list[tuple[str, str, str]]]
#: Hard negatives kept per pair (each training step samples from them).
NEGATIVE_POOL = 8
#: First-stage depth the negatives are mined from.
MINING_DEPTH = 30
#: Training variants, by which query each pair contributes (CAR's conditions). The
#: ``+synthetic`` ones add InPars / doc2query pairs: written by the LLM for sampled corpus
#: documents, as written or CAR-rewritten with their document like the real ones.
CONDITIONS = (
    "original",
    "car",
    "query-only",
    "original+car",
    "car-ambiguous",
    "original+synthetic",
    "car+synthetic",
)
SYNTHETIC_CONDITIONS = frozenset(c for c in CONDITIONS if c.endswith("+synthetic"))


@dataclass
class TrainPair:
    qid: str
    query: str
    doc_id: str
    negatives: list[str] = field(default_factory=list)
    margin: float = 0.0
    """Dense top-1 minus top-2 cosine of the original query (the ambiguity predictor)."""
    rewrites: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False
    """An InPars / doc2query query generated for ``doc_id``, not a judged train query."""


def synthetic_pairs(
    queries: Sequence[tuple[str, str, str]], qrels: dict[str, dict[str, int]]
) -> list[TrainPair]:
    """Training pairs from ``(qid, query, doc_id)`` synthetic queries; each query's document
    becomes its only judgment in ``qrels`` (so mining never takes it as a negative)."""
    for qid, _, doc_id in queries:
        if qid in qrels:
            raise ValueError(f"synthetic query id {qid!r} collides with a judged query")
        qrels[qid] = {doc_id: 1}
    return [TrainPair(qid, query, doc_id, synthetic=True) for qid, query, doc_id in queries]


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
    """The ambiguity rule: dense top-1 minus top-2 cosine below the median of the judged train
    queries (a flat top means the query does not single out one document)."""
    real = [p for p in pairs if not p.synthetic]
    if not real:
        return set()
    median = statistics.median(p.margin for p in real)
    return {p.qid for p in real if p.margin < median}


def condition_queries(
    condition: str, pair: TrainPair, ambiguous: AbstractSet[str]
) -> list[tuple[str, str]]:
    """``(query, source)`` pairs a condition trains on for one training pair. Synthetic pairs
    feed only the ``+synthetic`` conditions, which take the real pairs as their base does."""
    if condition in SYNTHETIC_CONDITIONS:
        base = condition.removesuffix("+synthetic")
        if not pair.synthetic:
            return condition_queries(base, pair, ambiguous)
        if base == "original":
            return [(pair.query, "synthetic")]
        return [(pair.rewrites["context"], "synthetic-car")]
    if pair.synthetic:
        return []
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


def rewrite_modes(conditions: Sequence[str]) -> tuple[str, ...]:
    """The rewrite modes the conditions train on (only those are generated: minutes each)."""
    needed = set()
    if set(conditions) - {"original", "query-only", "original+synthetic"}:
        needed.add("context")
    if "query-only" in conditions:
        needed.add("query-only")
    return tuple(m for m in ("context", "query-only") if m in needed)


@dataclass
class PreparedPairs:
    pairs: list[TrainPair]
    dropped: int
    """Train queries left out because all their relevant documents are test-judged."""
    synthetic_requested: int = 0


def prepare_pairs(
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    forbidden_docs: AbstractSet[str],
    *,
    conditions: Sequence[str],
    limit: int,
    seed: int,
    search: Search,
    rewrite: Rewrite,
    synthesize: Synthesize | None = None,
    synthetic: int = 0,
    progress_for: Callable[[str], Progress | None] = lambda stage: None,
) -> PreparedPairs:
    """Everything the conditions train on: judged train pairs, InPars pairs when a
    ``+synthetic`` condition asks for them, hard negatives for all, and the rewrites the
    conditions use (synthetic pairs get the context rewrite only, for ``car+synthetic``)."""
    pairs, dropped = training_pairs(queries, qrels, forbidden_docs, limit, seed)
    judged: dict[str, dict[str, int]] = {q: dict(docs) for q, docs in qrels.items()}
    requested = synthetic if SYNTHETIC_CONDITIONS & set(conditions) else 0
    if requested:
        if synthesize is None:
            raise ValueError("a +synthetic condition needs a synthesize callable")
        pairs += synthetic_pairs(synthesize(requested, progress_for("synthetic")), judged)
    mine(pairs, judged, search, forbidden_docs, progress_for("mine"))
    for mode in rewrite_modes(conditions):
        rewrite_synthetic = mode == "context" and "car+synthetic" in conditions
        targets = [p for p in pairs if rewrite_synthetic or not p.synthetic]
        for pair, rewritten in zip(
            targets, rewrite(targets, mode, progress_for(f"rewrite ({mode})")), strict=True
        ):
            pair.rewrites[mode] = rewritten
    return PreparedPairs(pairs, dropped, requested)


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
