"""``lodestar eval decompose``: does query decomposition raise supporting-document recall?

For each of the first ``limit`` HotpotQA dev questions and each ``subqueries`` setting N, the
orchestrator's multi-round loop (``AnswerPipeline.rounds``, fixed policy, ``rounds`` rounds, k new
documents per round, greedy SmolLM2) runs with N sub-queries in round 1: the question plus up to
N - 1 the decomposer wrote (N = 1 is the single query), each retrieved through
``SearchPipeline`` (dense + BM25, RRF) and fused with RRF across the sub-queries. Reported per N
and per round: supporting-document recall (the share of the question's two gold paragraphs among
the documents read so far, i.e. recall@k after round 1, @2k after round 2), the sub-queries kept,
how follow-up queries fared against the validator (the reasoner's own, a fallback, none), and the
answers (EM, F1, Acc) under three answer-selection rules — first confident round, last round,
majority — which is what picks ``/answer``'s rule when no critic is trained.

Round 1 is also measured for the decomposer's sub-queries *without* the question
(``keep_question`` off), from the same generations (retrieval only, no extra model call).

The loop's generations are remembered by prompt (``ReplayingGenerator``; on disk with
``--generation-cache``), so every setting after the first reuses what it shares, and a rerun
regenerates nothing. ``--minutes`` stops starting new questions after that budget: the figures
are over the questions every setting finished.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lodestar.evaluation.common import (
    RESULTS_DIR,
    EvalUsageError,
    collection_name,
    ensure_collection,
    format_significance,
    lookup,
    print_and_save,
    provenance,
    significance_block,
    significance_table,
)
from lodestar.evaluation.rag import (
    DATASETS,
    DEFAULT_K,
    RagContext,
    answer_in_prediction,
    support_recall_per_round,
)
from shared.models import LLM_ID
from shared.schemas import QAExample
from shared.settings import Settings

DEFAULT_LIMIT = 40
DEFAULT_ROUNDS = 2
DEFAULT_SETTINGS = (1, 2, 3)
SELECTION_RULES = ("first_confident", "last", "majority")


def _norm(answer: str) -> str:
    from shared.metrics import normalize_answer

    return str(normalize_answer(answer))


def select_answer(answers: Sequence[str], rule: str) -> str:
    """The answer a selection rule returns from one trajectory's per-round answers."""
    from services.orchestrator.prompts import is_unsure

    real = [a for a in answers if not is_unsure(a)]
    if not answers:
        return ""
    if rule == "first_confident":
        return real[0] if real else answers[-1]
    if rule == "last":
        return real[-1] if real else answers[-1]
    if rule == "majority":
        if not real:
            return answers[-1]
        counts = Counter(_norm(a) for a in real)
        best = max(counts.values())
        return next(a for a in real if counts[_norm(a)] == best)  # ties: the earliest
    raise ValueError(f"unknown selection rule {rule!r}")


async def round_one(
    context: RagContext, example: QAExample, settings_n: Sequence[int]
) -> dict[str, Any]:
    """Round 1 for every setting from one decomposition (the prompt is the same for every N):
    the product's ``AnswerPipeline.decompose`` and ``search_round``, with and without the
    question among the sub-queries. Retrieval only: no answer is generated."""
    from services.orchestrator.decompose import choose_subqueries
    from services.orchestrator.prompts import MAX_SUBQUERIES
    from shared.store import Trace

    pipeline = context.loop_pipeline
    trace = Trace(kind="answer", request={})
    decomposition = await pipeline.decompose(trace, example.question, MAX_SUBQUERIES)
    raw = trace.stages[-1].outputs.get("raw")
    out: dict[str, Any] = {"decomposer_raw": raw, "proposed": decomposition.proposed}
    for n in settings_n:
        for keep in (True, False) if n > 1 else (True,):
            chosen = choose_subqueries(example.question, raw, n, keep_question=keep).subqueries
            searched = await pipeline.search_round(trace, chosen, context.collection, context.k)
            ids = [h.doc_id for h in searched.hits[: context.k]]
            recall = support_recall_per_round([ids], example.supporting_doc_ids)
            name = f"N={n}" + ("" if keep else " without question")
            out[name] = {
                "subqueries": [sq.text for sq in chosen],
                "retrieved": ids,
                "recall_r1": round(recall[0], 4) if recall else None,
            }
    return out


async def run_question(
    context: RagContext, example: QAExample, n: int, rounds: int
) -> dict[str, Any]:
    from services.orchestrator.rounds import StopPolicy
    from shared.metrics import exact_match, f1

    trace, outcome = await context.run_loop(
        example, max_rounds=rounds, policy=StopPolicy.fixed, subqueries=n
    )
    retrieved = [[h.doc_id for h in record.hits] for record in outcome.rounds]
    recall = support_recall_per_round(retrieved, example.supporting_doc_ids)
    # A trajectory that stopped early keeps its recall for the rounds it did not run.
    recall += [recall[-1]] * (rounds - len(recall)) if recall else []
    decompose = next(s for s in trace.stages if s.stage == "decompose")
    queries = [s.outputs for s in trace.stages if s.stage == "query"]
    answers = [record.answer for record in outcome.rounds]
    row: dict[str, Any] = {
        "question": example.question,
        "answers": example.answers,
        "subqueries": [sq.text for sq in outcome.rounds[0].subqueries],
        "decomposer_raw": decompose.outputs.get("raw"),
        "rejected_subqueries": decompose.outputs.get("rejected"),
        "retrieved": retrieved,
        "round_answers": answers,
        "follow_ups": [
            {k: q.get(k) for k in ("proposed", "problem", "origin", "query")} for q in queries
        ],
        "stop_reason": outcome.stop_reason,
        "rounds_run": len(outcome.rounds),
        "new_tokens": sum(r.new_tokens for r in outcome.rounds)
        + int(decompose.outputs.get("new_tokens") or 0),
        "model_seconds": round(
            sum(r.generation.seconds for r in outcome.rounds)
            + sum(r.query_generation.seconds for r in outcome.rounds if r.query_generation),
            2,
        ),
    }
    for i, value in enumerate(recall, start=1):
        row[f"recall_r{i}"] = round(value, 4)
    for rule in SELECTION_RULES:
        chosen = select_answer(answers, rule)
        row[f"{rule}_answer"] = chosen
        row[f"{rule}_em"] = exact_match(chosen, example.answers)
        row[f"{rule}_f1"] = round(f1(chosen, example.answers), 4)
        row[f"{rule}_acc"] = answer_in_prediction(chosen, example.answers)
    return row


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def summarise(rows: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    values = list(rows.values())
    summary: dict[str, Any] = {
        "recall_per_round": [
            _mean([r.get(f"recall_r{i}") for r in values]) for i in range(1, rounds + 1)
        ],
        "both_gold_per_round": [
            _mean([float(r.get(f"recall_r{i}") == 1.0) for r in values])
            for i in range(1, rounds + 1)
        ],
        "mean_subqueries": _mean([len(r["subqueries"]) for r in values]),
        "rounds_run": _mean([r["rounds_run"] for r in values]),
        "new_tokens": _mean([r["new_tokens"] for r in values]),
        "model_seconds": _mean([r["model_seconds"] for r in values]),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in values)),
        "follow_up_origins": dict(
            Counter(str(f["origin"]) for r in values for f in r["follow_ups"])
        ),
        "follow_up_problems": dict(
            Counter(str(f["problem"]) for r in values for f in r["follow_ups"] if f["problem"])
        ),
        "selection": {
            rule: {m: _mean([r[f"{rule}_{m}"] for r in values]) for m in ("em", "f1", "acc")}
            for rule in SELECTION_RULES
        },
    }
    return summary


async def evaluate_decompose_async(
    settings: Settings,
    *,
    dataset: str = "hotpotqa-dev",
    limit: int = DEFAULT_LIMIT,
    settings_n: Sequence[int] = DEFAULT_SETTINGS,
    rounds: int = DEFAULT_ROUNDS,
    k: int = DEFAULT_K,
    generation_cache: Path | None = None,
    minutes: float | None = None,
    loop_minutes: float | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Phase 1: round-1 recall for every setting on all ``limit`` questions (one decomposition
    per question, retrieval only). Phase 2: the whole ``rounds``-round loop for every setting,
    question by question, until ``minutes`` (counted from the start) or ``loop_minutes``
    (counted from the start of phase 2) run out."""
    from tqdm import tqdm

    from services.orchestrator.prompts import MAX_SUBQUERIES

    spec = lookup(dataset, DATASETS, "dataset")
    if not 2 <= limit <= 40:
        raise EvalUsageError(f"--limit must be between 2 and 40 (CPU budget), got {limit}")
    if not 1 <= rounds <= 4:
        raise EvalUsageError(f"--rounds must be between 1 and 4, got {rounds}")
    bad = [n for n in settings_n if not 1 <= n <= MAX_SUBQUERIES]
    if bad or not settings_n:
        raise EvalUsageError(f"sub-query settings must be between 1 and {MAX_SUBQUERIES}")
    questions, corpus = spec.load()
    questions = questions[:limit]
    collection = collection_name(dataset)
    context = RagContext(settings, collection, k, None, generation_cache)
    version = ensure_collection(context.engine, collection, lambda: corpus, rebuild=False)
    started = time.perf_counter()
    first: dict[str, dict[str, Any]] = {}
    for example in tqdm(questions, desc="round 1, every setting", disable=not show_progress):
        first[example.id] = await round_one(context, example, settings_n)
    phase1_s = time.perf_counter() - started
    names = [name for name in next(iter(first.values())) if name.startswith("N=")]
    round_one_summary = {
        name: {
            "recall_r1": _mean([row[name]["recall_r1"] for row in first.values()]),
            "both_gold_r1": _mean([float(row[name]["recall_r1"] == 1.0) for row in first.values()]),
            "mean_subqueries": _mean([len(row[name]["subqueries"]) for row in first.values()]),
        }
        for name in names
    }
    round_one_items = {
        name: {qid: {"recall_r1": row[name]["recall_r1"]} for qid, row in first.items()}
        for name in names
    }
    per_setting: dict[str, dict[str, dict[str, Any]]] = {f"N={n}": {} for n in settings_n}
    stopped_early = False
    loop_started = time.perf_counter()
    for example in tqdm(questions, desc=f"{rounds}-round loop", disable=not show_progress):
        over = minutes is not None and time.perf_counter() - started > minutes * 60
        if over or (
            loop_minutes is not None and time.perf_counter() - loop_started > loop_minutes * 60
        ):
            stopped_early = True
            break
        for n in settings_n:
            per_setting[f"N={n}"][example.id] = await run_question(context, example, n, rounds)
    done = min(len(rows) for rows in per_setting.values())
    metrics = [f"recall_r{i}" for i in range(1, rounds + 1)] + ["first_confident_acc"]
    single = per_setting.get("N=1", {})
    selection_pairs = {
        rule: {
            qid: {"acc": row[f"{rule}_acc"], "f1": row[f"{rule}_f1"]} for qid, row in single.items()
        }
        for rule in SELECTION_RULES
    }
    return {
        "kind": "decompose",
        "dataset": dataset,
        "num_questions": len(questions),
        "loop_questions": done,
        "limit": limit,
        "stopped_early": stopped_early,
        "rounds": rounds,
        "k": k,
        "collection": collection,
        "collection_version": version,
        "generator": LLM_ID,
        "max_new_tokens": settings.answer_max_new_tokens,
        "phase1_s": round(phase1_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        **provenance(),
        "round_one": round_one_summary,
        "round_one_significance": significance_table(round_one_items, ("recall_r1",)),
        "settings": {name: summarise(rows, rounds) for name, rows in per_setting.items() if rows},
        "significance": significance_table(per_setting, metrics) if done >= 2 else [],
        "selection_significance_n1": significance_table(selection_pairs, ("acc", "f1"))
        if len(single) >= 2
        else [],
        "per_question_round_one": first,
        "per_question": per_setting,
    }


def format_decompose(result: dict[str, Any]) -> str:
    rounds = result["rounds"]
    lines = [
        f"{result['dataset']}: round 1 on {result['num_questions']} questions "
        f"({result['phase1_s']} s); the {rounds}-round loop on {result['loop_questions']}; "
        f"k {result['k']} new documents per round; {result['wall_s']} s",
        "",
        f"{'round 1':<22} {'recall@k':>9} {'both gold':>9} {'sub-queries':>11}",
    ]
    for name, s in result["round_one"].items():
        lines.append(
            f"{name:<22} {s['recall_r1']:>9.4f} {s['both_gold_r1']:>9.4f} "
            f"{s['mean_subqueries']:>11.2f}"
        )
    if result["round_one_significance"]:
        lines += ["", format_significance(result["round_one_significance"])]
    lines += [
        "",
        f"{'loop':<8} "
        + " ".join(f"{'R@r' + str(i):>7}" for i in range(1, rounds + 1))
        + f" {'tokens':>7} {'model s':>8}  follow-ups",
    ]
    for name, s in result["settings"].items():
        recall = " ".join(
            f"{v:>7.4f}" if v is not None else f"{'—':>7}" for v in s["recall_per_round"]
        )
        lines.append(
            f"{name:<8} {recall} {s['new_tokens']:>7.1f} {s['model_seconds']:>8.2f}  "
            f"{s['follow_up_origins']}"
        )
    lines += ["", "answer selection (EM / F1 / Acc):"]
    for name, s in result["settings"].items():
        parts = [
            f"{rule} {v['em']:.3f}/{v['f1']:.3f}/{v['acc']:.3f}"
            for rule, v in s["selection"].items()
        ]
        lines.append(f"  {name:<6} " + "  ".join(parts))
    lines += significance_block(result["significance"])
    lines += significance_block(result["selection_significance_n1"], "selection rules, N=1:")
    return "\n".join(lines)


def run_decompose_command(
    settings: Settings,
    *,
    dataset: str,
    limit: int,
    settings_text: str,
    rounds: int,
    k: int,
    out_dir: Path | None,
    generation_cache: Path | None,
    minutes: float | None,
    loop_minutes: float | None = None,
) -> dict[str, Any]:
    try:
        settings_n = [int(x) for x in settings_text.split(",") if x.strip()]
    except ValueError as exc:
        raise EvalUsageError(
            f"--settings must be integers like 1,2,3, got {settings_text!r}"
        ) from exc
    result = asyncio.run(
        evaluate_decompose_async(
            settings,
            dataset=dataset,
            limit=limit,
            settings_n=settings_n,
            rounds=rounds,
            k=k,
            generation_cache=generation_cache,
            minutes=minutes,
            loop_minutes=loop_minutes,
        )
    )
    path = (out_dir or RESULTS_DIR) / f"decompose-{dataset}-{result['num_questions']}q.json"
    print_and_save(format_decompose(result), path, result, "question")
    return result
