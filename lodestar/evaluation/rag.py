"""RAG evaluation: question answering with and without retrieval, on real QA data.

A *method* (:data:`METHODS`) answers one question and reports what it did: the answer, the
documents retrieved in each round, tokens generated, latency. Methods run the product's code:

- ``none``: the LLM answers alone (``build_closed_book_messages``), the no-retrieval baseline;
- ``single``: the orchestrator's ``AnswerPipeline`` (dense + BM25 fused with RRF, top k = 3,
  SmolLM2 answers from the passages), in-process or through a stack's ``POST /answer``.

- ``fixed-1`` … ``fixed-4``: the orchestrator's multi-round loop (``AnswerPipeline.rounds``)
  run for exactly that many rounds (it stops early only when retrieval finds nothing new or
  there is no usable next query: the reasoner's fails validation and no fallback is new), answering
  with the last round's answer;
- ``self-stop``: the same loop, stopping when the reasoner does not say "unsure" (its own
  confidence), up to 4 rounds;
- ``sim-rag``: the same loop governed by the trained critic (SIM-RAG), up to 4 rounds.

The loop methods share one deterministic (greedy) reasoner: a prompt answered once is answered
the same way again, so its generation is computed once per question and replayed by the other
loop methods (``ReplayingGenerator``). A loop method's latency is therefore the sum of the
measured times of the stages it used (retrieval, generation, critic), not its wall clock.

Metrics per question: SQuAD exact match and token F1 (``shared.metrics``); answer accuracy
``acc`` (a normalised gold answer occurs in the normalised prediction: lost-in-the-middle's
``best_subspan_em`` on whole words; FlashRAG's ``acc``), which credits a correct answer inside a sentence, as a
135M reader tends to write them; supporting-document recall (the share of the question's gold supporting documents among those retrieved so far,
after each round; the last value is the question's figure), rounds, tokens generated, latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lodestar.evaluation.common import (
    RESULTS_DIR,
    EvalUsageError,
    collection_name,
    ensure_collection,
    latency_summary,
    lookup,
    parse_names,
    print_and_save,
    resolve_run,
    result_tail,
    significance_block,
)
from lodestar.evaluation.retrieval import HttpBackend
from shared.datasets import load_hotpotqa, load_nq_open_oracle
from shared.models import LLM_ID, ChatModel, Generation
from shared.schemas import Document, QAExample
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.store import Trace

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
    latency_ms: float | None = None
    """The method's own account of its latency (loop methods: the sum of their stages' measured
    times); ``None``: the harness's wall clock."""
    judged: list[dict[str, Any]] | None = None
    """Rounds the critic judged: ``{answer, accept, p_accept, unsure}`` each."""
    stop_reason: str | None = None
    """Why a multi-round method stopped (``accepted``, ``max_rounds``, ``repeated_query``, ...)."""


class ReplayingGenerator(ChatModel):
    """The reasoner, with greedy generations remembered by prompt: loop methods that share a
    trajectory prefix compute it once. Sampled generations are never replayed. The replayed
    ``Generation`` keeps its measured ``seconds``."""

    def __init__(self, generator: Any, cache_path: Path | None = None) -> None:
        self.generator = generator
        self.model_id = generator.model_id
        self._memory: dict[str, Generation] = {}
        self.cache_path = cache_path
        if cache_path is not None and cache_path.exists():
            with cache_path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        entry = json.loads(line)
                        self._memory[entry["key"]] = Generation(**entry["generation"])

    def _key(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> str:
        text = json.dumps([self.model_id, list(messages), max_new_tokens])
        return hashlib.sha256(text.encode()).hexdigest()

    def _generate(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Generation:
        if temperature > 0:
            sampled: Generation = self.generator.generate(
                messages, max_new_tokens=max_new_tokens, temperature=temperature
            )
            return sampled
        key = self._key(messages, max_new_tokens)
        if key not in self._memory:
            generation = self.generator.generate(messages, max_new_tokens=max_new_tokens)
            self._memory[key] = generation
            if self.cache_path is not None:
                # Kept on disk so a later run (e.g. once the critic is trained) replays them.
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as handle:
                    entry = {"key": key, "generation": dataclasses.asdict(generation)}
                    handle.write(json.dumps(entry) + "\n")
        return self._memory[key]

    def _stream(
        self, messages: Sequence[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str | Generation]:
        generation = self._generate(messages, max_new_tokens, temperature)
        yield generation.text
        yield generation


class InProcessCritic:
    """The critic service's engine in this process, verdicts remembered like generations."""

    def __init__(self, settings: Settings) -> None:
        from services.critic.engine import CriticEngine

        self.engine = CriticEngine(settings)
        self._memory: dict[tuple[str, str, str, str], Any] = {}

    async def judge(self, request: Any) -> Any:
        from shared.clients import JudgeResponse

        key = (request.question, request.context, request.answer, request.rationale)
        if key not in self._memory:
            verdict = await asyncio.to_thread(self.engine.judge, *key)
            self._memory[key] = JudgeResponse(
                accept=verdict.accept,
                p_accept=verdict.p_accept,
                model_version=verdict.model_version,
            )
        return self._memory[key]


class RagContext:
    """What a method may use: the settings, the question collection, ``k``, and either the
    in-process pipelines or a stack's orchestrator. Everything is created on first use."""

    def __init__(
        self,
        settings: Settings,
        collection: str,
        k: int,
        stack: HttpBackend | None,
        generation_cache: Path | None = None,
    ) -> None:
        self.settings = settings
        self.collection = collection
        self.k = k
        self.stack = stack
        self._answer_pipeline: Any = None
        self._loop_pipeline: Any = None
        self._reasoner: ReplayingGenerator | None = None
        self.generation_cache = generation_cache
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
        from shared.llm import chat_generator

        return chat_generator(self.settings)

    @property
    def reasoner(self) -> ReplayingGenerator:
        """The LLM with greedy generations remembered (on disk with ``generation_cache``)."""
        if self._reasoner is None:
            self._reasoner = ReplayingGenerator(self.generator, self.generation_cache)
        return self._reasoner

    @property
    def answer_pipeline(self) -> Any:
        """The orchestrator's ``AnswerPipeline`` over ``InProcessIndex``, wired as the app does."""
        if self._answer_pipeline is None:
            from services.orchestrator.pipeline import answer_pipeline, in_process_search

            search = in_process_search(self.settings, self.engine)
            self._answer_pipeline = answer_pipeline(self.settings, search, lambda: self.reasoner)
        return self._answer_pipeline

    @property
    def loop_pipeline(self) -> Any:
        """An ``AnswerPipeline`` for the multi-round methods: replaying reasoner, in-process
        critic (loaded on its first judgement, so the baselines need no trained critic)."""
        if self._loop_pipeline is None:
            from services.orchestrator.pipeline import answer_pipeline, in_process_search

            search = in_process_search(self.settings, self.engine)
            self._loop_pipeline = answer_pipeline(
                self.settings, search, lambda: self.reasoner, critic=InProcessCritic(self.settings)
            )
        return self._loop_pipeline

    async def stack_answer(self, example: QAExample, max_rounds: int) -> Any:
        """The stack's ``POST /answer`` body for ``example``."""
        assert self.stack is not None, "an in-process context has no stack"
        return await self.stack.post(
            "/answer",
            {
                "question": example.question,
                "collection": self.collection,
                "k": self.k,
                "max_rounds": max_rounds,
            },
        )

    async def run_loop(self, example: QAExample, **options: Any) -> tuple[Trace, Any]:
        """The in-process multi-round loop on ``example`` and the trace it filled; ``options``
        (``max_rounds``, ``policy``...) go to ``AnswerPipeline.run_rounds``."""
        from shared.store import Trace

        trace = Trace(kind="answer", request={"question": example.question, "k": self.k})
        outcome = await self.loop_pipeline.run_rounds(
            trace, question=example.question, collection=self.collection, k=self.k, **options
        )
        return trace, outcome


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
    from services.orchestrator.prompts import build_closed_book_messages, clean_answer

    generator = context.reasoner
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
        # Measured generation time: the same account whether generated now or replayed.
        latency_ms=generation.seconds * 1000,
    )


async def answer_single_round(context: RagContext, example: QAExample) -> RagOutcome:
    """The orchestrator's single-round ``AnswerPipeline`` (or the stack's ``/answer``)."""
    if context.stack is not None:
        body = await context.stack_answer(example, max_rounds=1)
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
        latency_ms=outcome.timings_ms.get("retrieve", 0.0)
        + outcome.timings_ms.get("fusion", 0.0)
        + outcome.generation.seconds * 1000,
    )


#: The most rounds of the adaptive loop methods (SIM-RAG's inference ``max_turns``).
LOOP_MAX_ROUNDS = 4


def loop_method(policy: str, max_rounds: int) -> MethodAnswer:
    """A method running the orchestrator's multi-round loop with one stopping ``policy``."""

    async def answer(context: RagContext, example: QAExample) -> RagOutcome:
        from services.orchestrator.prompts import is_unsure
        from services.orchestrator.rounds import AnswerSelection, StopPolicy

        stop = StopPolicy(policy)
        if context.stack is not None and stop is StopPolicy.critic:
            body = await context.stack_answer(example, max_rounds=max_rounds)
            return RagOutcome(
                answer=body["answer"],
                raw_answer=body["answer"],
                rounds=[list(r["hit_ids"]) for r in body["rounds"]],
                new_tokens=None,
                prompt_tokens=None,
                stop_reason=body["stop_reason"],
                judged=[
                    {
                        "answer": r["answer"],
                        "accept": r["accept"],
                        "p_accept": r["p_accept"],
                        "unsure": is_unsure(r["answer"]),
                    }
                    for r in body["rounds"]
                    if r["accept"] is not None
                ],
            )
        if context.stack is not None:
            raise EvalUsageError(f"method with stop policy {policy!r} runs in-process only")
        _, outcome = await context.run_loop(
            example,
            max_rounds=max_rounds,
            policy=stop,
            # fixed-k answers with round k (the classic baseline, comparable with the recorded
            # results); the product returns the first confident round when nothing judged.
            selection=AnswerSelection.last if stop is StopPolicy.fixed else AnswerSelection.auto,
        )
        latency = sum(sum(record.timings_ms.values()) for record in outcome.rounds)
        return RagOutcome(
            answer=outcome.answer,
            raw_answer=outcome.rounds[-1].raw,
            rounds=[[hit.doc_id for hit in record.hits] for record in outcome.rounds],
            new_tokens=sum(record.new_tokens for record in outcome.rounds),
            prompt_tokens=sum(record.prompt_tokens for record in outcome.rounds),
            latency_ms=latency,
            stop_reason=outcome.stop_reason,
            judged=[
                {
                    "answer": record.answer,
                    "accept": record.accept,
                    "p_accept": record.p_accept,
                    "unsure": is_unsure(record.answer),
                }
                for record in outcome.rounds
                if record.accept is not None
            ]
            if stop is StopPolicy.critic
            else None,
        )

    return answer


METHODS: dict[str, RagMethod] = {
    "none": RagMethod(
        "none", "no retrieval: SmolLM2 answers from its own knowledge", answer_closed_book, False
    ),
    "single": RagMethod(
        "single",
        "single-round RAG: RRF(dense, bm25) top 3, SmolLM2 answers with citations",
        answer_single_round,
    ),
    **{
        f"fixed-{n}": RagMethod(
            f"fixed-{n}",
            f"multi-round loop, always {n} round(s): answer + rationale, reasoner-written queries",
            loop_method("fixed", n),
        )
        for n in (1, 2, 3, 4)
    },
    "self-stop": RagMethod(
        "self-stop",
        f"multi-round loop stopping when the reasoner does not say unsure (<= {LOOP_MAX_ROUNDS})",
        loop_method("self", LOOP_MAX_ROUNDS),
    ),
    "sim-rag": RagMethod(
        "sim-rag",
        f"multi-round loop stopping when the trained critic accepts (<= {LOOP_MAX_ROUNDS})",
        loop_method("critic", LOOP_MAX_ROUNDS),
    ),
}
"""RAG methods by name."""


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
        "latency_ms": round(latency_ms if outcome.latency_ms is None else outcome.latency_ms, 1),
        "judged": outcome.judged,
        "stop_reason": outcome.stop_reason,
    }


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def summarise(per_question: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = list(per_question.values())
    metrics = {m: _mean([row[m] for row in rows]) for m in METRICS}
    summary: dict[str, Any] = {
        "metrics": metrics,
        "latency_ms": latency_summary([row["latency_ms"] for row in rows]),
    }
    stops = [str(row["stop_reason"]) for row in rows if row.get("stop_reason")]
    if stops:
        summary["stop_reasons"] = {reason: stops.count(reason) for reason in sorted(set(stops))}
    judgements = judgement_report(per_question)
    if judgements is not None:
        summary["critic_vs_self"] = judgements
    return summary


def judgement_report(per_question: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """On the rounds the critic judged (evaluation questions, never seen in training): accuracy,
    precision and recall of its "accept" against whether the round's answer was right, beside the
    reasoner's self-assessment (accept unless "unsure") on the same rounds, by EM and by Acc."""
    from services.critic.training import binary_report
    from shared.metrics import exact_match

    judged = [(row, item) for row in per_question.values() for item in (row.get("judged") or [])]
    if not judged:
        return None
    report: dict[str, Any] = {"rounds_judged": len(judged)}
    for rule in ("em", "acc"):
        gold = [
            int(
                exact_match(item["answer"], row["answers"])
                if rule == "em"
                else answer_in_prediction(item["answer"], row["answers"])
            )
            for row, item in judged
        ]
        report[rule] = {
            "positive_rate": round(sum(gold) / len(gold), 4),
            "critic": binary_report([bool(item["accept"]) for _, item in judged], gold),
            "self_assessment": binary_report([not item["unsure"] for _, item in judged], gold),
        }
    return report


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
    generation_cache: Path | None = None,
) -> dict[str, Any]:
    """Answer the first ``limit`` questions of ``dataset`` with each method; the results document."""
    from tqdm import tqdm

    spec, chosen = resolve_run(dataset, DATASETS, methods, METHODS, "method", limit)
    if not 1 <= k <= settings.max_k:
        raise EvalUsageError(f"k must be between 1 and {settings.max_k}, got {k}")
    questions, corpus = spec.load()
    questions = questions[:limit] if limit is not None else questions
    collection = collection_name(dataset)
    started = time.perf_counter()
    http = HttpBackend(stack, settings, timeout_s=settings.request_timeout_s) if stack else None
    context = RagContext(settings, collection, k, http, generation_cache)
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
        **result_tail(
            started, ("methods", per_method), ("per_question", per_question), SIGNIFICANCE_METRICS
        ),
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
    for name, row in result["methods"].items():
        judged = row.get("critic_vs_self")
        if not judged:
            continue
        lines += [
            "",
            f"{name}: the critic's accept vs the reasoner's self-assessment on "
            f"{judged['rounds_judged']} judged rounds",
        ]
        for rule in ("em", "acc"):
            block = judged[rule]
            for who in ("critic", "self_assessment"):
                r = block[who]
                lines.append(
                    f"  by {rule:<3} (positives {block['positive_rate']:.2f}) {who:<15} "
                    f"acc {r['accuracy']:.3f}  P {r['precision']:.3f}  R {r['recall']:.3f}  "
                    f"accept rate {r['accept_rate']:.2f}"
                )
    lines += significance_block(result["significance"])
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
    generation_cache: Path | None = None,
) -> dict[str, Any]:
    """``lodestar eval rag``: evaluate, print, save JSON under ``out_dir``."""
    lookup(dataset, DATASETS, "dataset")
    methods = parse_names(methods_text, METHODS, "method")
    result = evaluate_rag(
        settings,
        dataset,
        methods,
        limit=limit,
        k=k,
        stack=stack,
        rebuild=rebuild,
        generation_cache=generation_cache,
    )
    path = result_path(out_dir or RESULTS_DIR, dataset, result["num_questions"])
    print_and_save(format_rag(result), path, result, "question")
    return result
