"""The cross-encoder training job: SciFact train pairs → hard negatives → (CAR rewrites) → train →
publish. It composes the index engine (first stage), the rewriter engine (rewrites, cached) and
the reranker's trainer in one process, which is the worker's role; the reranker serves the
published version from its next request. ``lodestar experiment car`` measures the conditions;
this job trains the chosen one for serving (``lodestar.cross_encoder_train``, or
``lodestar rerank train`` in process).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from services.reranker.cross_encoder import (
    CrossEncoderTrainConfig,
    TextDoc,
    publish_cross_encoder,
    train_cross_encoder,
)
from services.reranker.training_data import (
    CONDITIONS,
    PreparedPairs,
    Search,
    TrainPair,
    examples_for,
    prepare_pairs,
    rewrite_modes,
    training_pairs,
)
from shared.settings import Settings

Progress = Callable[[int, int, str], None]
#: The collection the first stage searches (the evaluation harness's name for SciFact).
COLLECTION = "eval-scifact"
#: InPars consistency filter: a synthetic query is kept only if the hybrid first stage ranks
#: its source document within this depth (0 keeps every query the model wrote).
SYNTHETIC_FILTER_DEPTH = 10


def scifact_training_pairs(
    settings: Settings,
    dataset: Any,
    search: Search,
    *,
    conditions: Sequence[str],
    train_queries: int,
    seed: int,
    synthetic: int = 0,
    synthetic_filter: int = SYNTHETIC_FILTER_DEPTH,
    documents: Sequence[Any] | None = None,
    progress_for: Callable[[str], Progress | None] = lambda stage: None,
) -> PreparedPairs:
    """SciFact train pairs for ``conditions``, rewrites and InPars queries from the rewriter
    engine (cached on disk). Synthetic queries are written for ``documents`` (the searched
    corpus; all of SciFact by default) that no test claim is judged on, sampled with ``seed``.
    Shared by the experiment and the training job."""
    from services.rewriter.engine import PairDocument, RewritePair, RewriterEngine, sample_documents

    corpus = {doc.id: doc for doc in dataset.corpus}
    forbidden_docs = {d for docs in dataset.qrels["test"].values() for d in docs}
    rewriter = RewriterEngine.from_settings(settings)

    def rewrite(pairs: Sequence[TrainPair], mode: str, progress: Progress | None) -> list[str]:
        batch = [
            RewritePair(
                p.qid,
                p.query,
                PairDocument(p.doc_id, corpus[p.doc_id].title, corpus[p.doc_id].text),
            )
            for p in pairs
        ]
        records = rewriter.rewrite_batch(
            batch, mode, forbidden_doc_ids=forbidden_docs, progress=progress
        )
        return [r.rewritten_query for r in records]

    def synthesize(n: int, progress: Progress | None) -> list[tuple[str, str, str]]:
        searched = dataset.corpus if documents is None else documents
        allowed = [doc for doc in searched if doc.id not in forbidden_docs]
        retrieve = None
        if synthetic_filter > 0:

            def retrieve(query: str, k: int) -> list[str]:
                return search(query, k, ("dense", "bm25"))[0]

        batch = rewriter.generate_queries(
            sample_documents(allowed, n, seed),
            retrieve=retrieve,
            top_k=max(1, synthetic_filter),
            progress=progress,
        )
        return [(q.qid, q.query, q.doc_id) for q in batch.kept]

    return prepare_pairs(
        dataset.queries,
        dataset.qrels["train"],
        forbidden_docs,
        conditions=conditions,
        limit=train_queries,
        seed=seed,
        search=search,
        rewrite=rewrite,
        synthesize=synthesize,
        synthetic=synthetic,
        progress_for=progress_for,
    )


def train_and_publish(
    settings: Settings,
    *,
    condition: str = "car",
    train_queries: int = 250,
    config: CrossEncoderTrainConfig | None = None,
    seed: int = 0,
    synthetic: int = 0,
    corpus_limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one condition's cross-encoder on SciFact train and publish it; the manifest.
    ``synthetic``: InPars queries to add for a ``+synthetic`` condition.

    ``corpus_limit`` (tests, smoke runs) searches a slice instead of the whole corpus: its first
    documents plus those judged for the sampled train queries, in a collection of its own."""
    from services.index.engine import IndexEngine
    from services.orchestrator.pipeline import in_process_search
    from services.rewriter.engine import RewriterEngine
    from shared.datasets import load_scifact
    from shared.store import Trace

    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    config = config or CrossEncoderTrainConfig(steps=200, max_length=160)
    started = time.perf_counter()
    dataset = load_scifact()
    corpus = {doc.id: doc for doc in dataset.corpus}
    forbidden_docs = {d for docs in dataset.qrels["test"].values() for d in docs}
    train_qrels = dataset.qrels["train"]
    collection, documents = COLLECTION, dataset.corpus
    if corpus_limit is not None:
        # The same seeded sample prepare_pairs draws below (cheap): its judged documents must be
        # in the slice before anything is searched.
        sampled, _ = training_pairs(
            dataset.queries, train_qrels, forbidden_docs, train_queries, seed
        )
        judged = {d for p in sampled for d in train_qrels[p.qid]}
        documents = [
            doc for i, doc in enumerate(dataset.corpus) if i < corpus_limit or doc.id in judged
        ]
        collection = f"train-scifact-{corpus_limit}"
    engine = IndexEngine.from_settings(settings)
    if not engine.exists(collection):
        engine.upsert(collection, documents, progress=progress)
    pipeline = in_process_search(settings, engine)

    def search(query: str, k: int, retrievers: tuple[str, ...]) -> tuple[list[str], list[float]]:
        trace = Trace(kind="search", request={})
        outcome = asyncio.run(
            pipeline.run(trace, query=query, collection=collection, k=k, retrievers=retrievers)
        )
        return [h.doc_id for h in outcome.hits], [h.score for h in outcome.hits]

    prepared = scifact_training_pairs(
        settings,
        dataset,
        search,
        conditions=[condition],
        train_queries=train_queries,
        seed=seed,
        synthetic=synthetic,
        documents=documents,
        progress_for=lambda stage: progress,
    )
    uses_llm = bool(rewrite_modes([condition]) or prepared.synthetic_requested)

    def text_doc(doc_id: str) -> TextDoc:
        return TextDoc(doc_id, corpus[doc_id].title, corpus[doc_id].text)

    examples = examples_for(
        condition,
        prepared.pairs,
        text_doc,
        forbidden_qids=set(dataset.qrels["test"]),
        forbidden_docs=forbidden_docs,
    )
    trained = train_cross_encoder(examples, config, progress=progress)
    sources: dict[str, int] = {}
    for example in examples:
        sources[example.source] = sources.get(example.source, 0) + 1
    manifest = publish_cross_encoder(
        settings,
        trained,
        {
            "trained_by": "lodestar.cross_encoder_train",
            "condition": condition,
            "dataset": "scifact/train",
            "collection": collection,
            "config": asdict(config),
            "examples": len(examples),
            "sources": sources,
            "synthetic_pairs": sum(p.synthetic for p in prepared.pairs),
            "rewriter_model": RewriterEngine.from_settings(settings).model_id if uses_llm else None,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return {k: v for k, v in manifest.items() if k != "files"}
