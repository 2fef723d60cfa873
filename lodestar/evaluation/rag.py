"""RAG evaluation: question answering with and without retrieval, on real QA data.

A *method* (:data:`METHODS`) answers one question and reports what it did: the answer, the
documents retrieved in each round, tokens generated, latency. Methods run the product's code:

- ``none``: the LLM answers alone (``build_closed_book_messages``), the no-retrieval baseline;
- ``single``: the orchestrator's ``AnswerPipeline`` (dense + BM25 fused with RRF, top k = 3,
  SmolLM2 answers from the passages), in-process or through a stack's ``POST /answer``.

Multi-round methods (SIM-RAG, IRCoT-style) are further entries in :data:`METHODS`: a
:class:`RagMethod` whose ``answer`` coroutine returns one list of retrieved ids per round.

Metrics per question: SQuAD exact match and token F1 (``shared.metrics``); answer accuracy
``acc`` (a normalised gold answer occurs in the normalised prediction: lost-in-the-middle's
``best_subspan_em`` on whole words; FlashRAG's ``acc``), which credits a correct answer inside a sentence, as a
135M reader tends to write them; supporting-document recall (the share of the question's gold supporting documents among those retrieved so far,
after each round; the last value is the question's figure), rounds, tokens generated, latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lodestar.evaluation.common import (
    RESULTS_DIR,
    EvalUsageError,
    collection_name,
    ensure_collection,
    format_significance,
    latency_summary,
    lookup,
    parse_names,
    provenance,
    significance_table,
    write_json,
)
from lodestar.evaluation.retrieval import HttpBackend
from shared.datasets import load_hotpotqa, load_nq_open_oracle
from shared.models import LLM_ID
from shared.schemas import Document, QAExample
from shared.settings import Settings

#: Passages the single-round pipeline gives the reader (CompactDS passes the top 3).
DEFAULT_K = 3
#: Metrics reported per method, in this order.
METRICS = ("em", "f1", "acc", "support_recall", "rounds", "new_tokens")
SIGNIFICANCE_METRICS = ("em", "f1", "acc")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RagDataset:
    name: str
    description: str
    load: Callable[[], tuple[list[QAExample], list[Document]]]
    """``(questions, pooled corpus)``; each question's ``supporting_doc_ids`` are corpus ids."""


DATASETS: dict[str, RagDataset] = {
    "hotpotqa-dev": RagDataset(
        "hotpotqa-dev",
        "HotpotQA distractor dev subset: 300 multi-hop questions over 2,966 pooled paragraphs",
        lambda: load_hotpotqa("dev"),
    ),
    "nq-oracle": RagDataset(
        "nq-oracle",
        "NQ-open dev questions with their gold passage: 2,655 questions over 2,600 passages",
        load_nq_open_oracle,
    ),
}
"""QA datasets the RAG evaluation knows, by name (each name + ``eval-`` is its collection)."""


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass
class RagOutcome:
    answer: str
    raw_answer: str
    rounds: list[list[str]]
    """Doc ids retrieved in each round (empty for no retrieval)."""
    new_tokens: int | None
    prompt_tokens: int | None


class RagContext:
    """What a method may use: the settings, the question collection, ``k``, and either the
    in-process pipelines or a stack's orchestrator. Everything is created on first use."""

    def __init__(
        self, settings: Settings, collection: str, k: int, stack: HttpBackend | None
    ) -> None:
        self.settings = settings
        self.collection = collection
        self.k = k
        self.stack = stack
        self._answer_pipeline: Any = None
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        """The in-process ``IndexEngine`` over the data dir."""
        if self._engine is None:
            from services.index.engine import IndexEngine

            self._engine = IndexEngine.from_settings(self.settings)
        return self._engine

    @property
    def generator(self) -> Any:
        from shared.models import get_generator

        return get_generator(self.settings)

    @property
    def answer_pipeline(self) -> Any:
        """The orchestrator's ``AnswerPipeline`` over ``InProcessIndex``, wired as the app does."""
        if self._answer_pipeline is None:
            from services.index.engine import InProcessIndex
            from services.orchestrator.engine import AnswerPipeline, SearchPipeline

            settings = self.settings
            search = SearchPipeline(InProcessIndex(self.engine), rrf_k=settings.rrf_k)
            self._answer_pipeline = AnswerPipeline(
                search, lambda: self.generator, max_new_tokens=settings.answer_max_new_tokens
            )
        return self._answer_pipeline


MethodAnswer = Callable[[RagContext, QAExample], Awaitable[RagOutcome]]


@dataclass(frozen=True)
class RagMethod:
    name: str
    description: str
    answer: MethodAnswer
    retrieves: bool = True
    """False for methods that never search: no collection is needed for them."""


async def answer_closed_book(context: RagContext, example: QAExample) -> RagOutcome:
    """The LLM alone (always in-process: no stack endpoint answers without retrieval)."""
    from services.orchestrator.engine import build_closed_book_messages, clean_answer

    generator = context.generator
    generation = await asyncio.to_thread(
        generator.generate,
        build_closed_book_messages(example.question),
        max_new_tokens=context.settings.answer_max_new_tokens,
    )
    return RagOutcome(
        answer=clean_answer(generation.text),
        raw_answer=generation.text,
        rounds=[],
        new_tokens=generation.new_tokens,
        prompt_tokens=generation.prompt_tokens,
    )


async def answer_single_round(context: RagContext, example: QAExample) -> RagOutcome:
    """The orchestrator's single-round ``AnswerPipeline`` (or the stack's ``/answer``)."""
    if context.stack is not None:
        body = await context.stack.post(
            "/answer",
            {"question": example.question, "collection": context.collection, "k": context.k},
        )
        return RagOutcome(
            answer=body["answer"],
            raw_answer=body["answer"],
            rounds=[list(r["hit_ids"]) for r in body["rounds"]],
            new_tokens=None,  # the API does not report token counts
            prompt_tokens=None,
        )
    from shared.store import Trace

    trace = Trace(kind="answer", request={"question": example.question, "k": context.k})
    outcome = await context.answer_pipeline.run(
        trace, question=example.question, collection=context.collection, k=context.k
    )
    return RagOutcome(
        answer=outcome.answer,
        raw_answer=outcome.raw_answer,
        rounds=[[hit.doc_id for hit in outcome.hits]],
        new_tokens=outcome.generation.new_tokens,
        prompt_tokens=outcome.generation.prompt_tokens,
    )


METHODS: dict[str, RagMethod] = {
    "none": RagMethod(
        "none", "no retrieval: SmolLM2 answers from its own knowledge", answer_closed_book, False
    ),
    "single": RagMethod(
        "single",
        "single-round RAG: RRF(dense, bm25) top 3, SmolLM2 answers with citations",
        answer_single_round,
    ),
}
"""RAG methods by name. Multi-round methods (SIM-RAG critic, ...) are added here."""


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def support_recall_per_round(rounds: Sequence[Sequence[str]], gold: Sequence[str]) -> list[float]:
    """After each round, the share of the gold supporting documents retrieved so far."""
    gold_set = set(gold)
    if not gold_set:
        return []
    seen: set[str] = set()
    out = []
    for retrieved in rounds:
        seen.update(retrieved)
        out.append(len(gold_set & seen) / len(gold_set))
    return out


def answer_in_prediction(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if any SQuAD-normalised gold answer occurs in the normalised prediction, else 0.0.

    Lost-in-the-middle's ``best_subspan_em``, made stricter: the gold must match whole words, so
    a gold "1" does not match a prediction "2017"."""
    from shared.metrics import normalize_answer

    normalized = f" {normalize_answer(prediction)} "
    return float(
        any(
            gold_norm and f" {gold_norm} " in normalized
            for gold_norm in (normalize_answer(g) for g in golds)
        )
    )


def score_outcome(example: QAExample, outcome: RagOutcome, latency_ms: float) -> dict[str, Any]:
    from shared.metrics import exact_match, f1

    per_round = support_recall_per_round(outcome.rounds, example.supporting_doc_ids)
    return {
        "question": example.question,
        "answers": example.answers,
        "prediction": outcome.answer,
        "raw": outcome.raw_answer,
        "em": exact_match(outcome.answer, example.answers),
        "f1": round(f1(outcome.answer, example.answers), 4),
        "acc": answer_in_prediction(outcome.answer, example.answers),
        # No retrieval, no recall: None keeps the no-retrieval baseline out of this mean.
        "support_recall": round(per_round[-1], 4) if per_round else None,
        "support_recall_per_round": [round(r, 4) for r in per_round],
        "rounds": len(outcome.rounds),
        "retrieved": outcome.rounds,
        "new_tokens": outcome.new_tokens,
        "prompt_tokens": outcome.prompt_tokens,
        "latency_ms": round(latency_ms, 1),
    }


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def summarise(per_question: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = list(per_question.values())
    metrics = {m: _mean([row[m] for row in rows]) for m in METRICS}
    return {
        "metrics": metrics,
        "latency_ms": latency_summary([row["latency_ms"] for row in rows]),
    }


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


def result_path(out_dir: Path, dataset: str, num_questions: int) -> Path:
    return out_dir / f"rag-{dataset}-{num_questions}q.json"


async def evaluate_rag_async(
    settings: Settings,
    dataset: str,
    methods: Sequence[str],
    *,
    limit: int | None = None,
    k: int = DEFAULT_K,
    stack: str | None = None,
    rebuild: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Answer the first ``limit`` questions of ``dataset`` with each method; the results document."""
    from tqdm import tqdm

    spec = lookup(dataset, DATASETS, "dataset")
    chosen = [lookup(name, METHODS, "method") for name in methods]
    if not chosen:
        raise EvalUsageError(f"no method given; known: {', '.join(METHODS)}")
    if limit is not None and limit < 2:
        raise EvalUsageError(f"--limit must be at least 2 (paired tests need pairs), got {limit}")
    if not 1 <= k <= settings.max_k:
        raise EvalUsageError(f"k must be between 1 and {settings.max_k}, got {k}")
    questions, corpus = spec.load()
    questions = questions[:limit] if limit is not None else questions
    collection = collection_name(dataset)
    started = time.perf_counter()
    http = HttpBackend(stack, settings, timeout_s=settings.request_timeout_s) if stack else None
    context = RagContext(settings, collection, k, http)
    version: str | None = None
    try:
        if any(method.retrieves for method in chosen):
            if http is not None:
                version = str((await http.require_collection(collection)).get("version", ""))
            else:
                version = ensure_collection(
                    context.engine, collection, lambda: corpus, rebuild=rebuild
                )
        per_method: dict[str, Any] = {}
        per_question: dict[str, dict[str, dict[str, Any]]] = {}
        for method in chosen:
            # One untimed answer first: loads the models and the collection snapshot.
            await method.answer(context, questions[0])
            rows: dict[str, dict[str, Any]] = {}
            method_started = time.perf_counter()
            for example in tqdm(
                questions, desc=f"{dataset} {method.name}", unit="q", disable=not show_progress
            ):
                q_started = time.perf_counter()
                outcome = await method.answer(context, example)
                rows[example.id] = score_outcome(
                    example, outcome, (time.perf_counter() - q_started) * 1000
                )
            per_method[method.name] = {
                "description": method.description,
                **summarise(rows),
                "wall_s": round(time.perf_counter() - method_started, 1),
            }
            per_question[method.name] = rows
    finally:
        if http is not None:
            await http.aclose()
    return {
        "kind": "rag",
        "dataset": dataset,
        "num_questions": len(questions),
        "limit": limit,
        "k": k,
        "collection": collection,
        "collection_version": version,
        "backend": http.name if http is not None else "in-process",
        "generator": LLM_ID,
        "max_new_tokens": settings.answer_max_new_tokens,
        "wall_s": round(time.perf_counter() - started, 1),
        **provenance(),
        "methods": per_method,
        "significance": significance_table(per_question, SIGNIFICANCE_METRICS),
        "per_question": per_question,
    }


def evaluate_rag(
    settings: Settings, dataset: str, methods: Sequence[str], **kwargs: Any
) -> dict[str, Any]:
    return asyncio.run(evaluate_rag_async(settings, dataset, methods, **kwargs))


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_rag(result: dict[str, Any]) -> str:
    lines = [
        f"{result['dataset']}: {result['num_questions']} questions, k {result['k']}, "
        f"collection {result['collection']} ({result['backend']}), {result['wall_s']} s",
        f"{'method':<10} {'EM':>6} {'F1':>6} {'Acc':>6} {'supp.R':>7} {'rounds':>6} {'tokens':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8}",
    ]
    for name, row in result["methods"].items():
        m, lat = row["metrics"], row["latency_ms"]
        lines.append(
            f"{name:<10} {_fmt(m['em'], '.4f'):>6} {_fmt(m['f1'], '.4f'):>6} {_fmt(m['acc'], '.4f'):>6} "
            f"{_fmt(m['support_recall'], '.4f'):>7} {_fmt(m['rounds'], '.2f'):>6} "
            f"{_fmt(m['new_tokens'], '.1f'):>7} {lat['p50']:>8.0f} {lat['p95']:>8.0f}"
        )
    if result["significance"]:
        lines += [
            "",
            "paired significance (two-sided):",
            format_significance(result["significance"]),
        ]
    return "\n".join(lines)


def run_rag_command(
    settings: Settings,
    dataset: str,
    methods_text: str,
    *,
    limit: int | None,
    k: int,
    stack: str | None,
    out_dir: Path | None,
    rebuild: bool = False,
) -> dict[str, Any]:
    """``lodestar eval rag``: evaluate, print, save JSON under ``out_dir``."""
    lookup(dataset, DATASETS, "dataset")
    methods = parse_names(methods_text, METHODS, "method")
    result = evaluate_rag(
        settings, dataset, methods, limit=limit, k=k, stack=stack, rebuild=rebuild
    )
    print(format_rag(result))
    path = result_path(out_dir or RESULTS_DIR, dataset, result["num_questions"])
    write_json(path, result)
    print(f"\nper-question results: {path}")
    return result
