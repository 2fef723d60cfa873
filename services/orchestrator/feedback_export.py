"""Feedback → training examples (NExT-Search's offline-update input), plain Python.

One example type per stage family, for the offline update NExT-Search (Dai et al., SIGIR 2025)
proposes (preference pairs for the decomposer, relevance labels for the ranker, corrected answers
for the generator):

- ``rel_label`` from document feedback on ``retrieve``/``fusion``/``rerank``: the query, the
  document and a 0/1 label (``relevant`` and ``pin`` → 1, ``irrelevant`` and ``remove`` → 0),
  with ``hard_negatives``: first the documents the same source marked irrelevant/removed in that
  trace, then the trace's other documents of that stage's ranking, best first, that no feedback
  marked relevant or pinned (at most ``negatives`` in all; never the labelled document);
- ``pref_pair`` from sub-query feedback (``decompose``, or any stage whose targets are
  sub-queries): per trace and source, ``rejected`` is the sub-query list the stage produced and
  ``chosen`` the list after that source's edits, additions, deletions and reorders, in order;
- ``sft`` from ``correct_span`` / ``preferred_answer`` on the answer or a claim (``generate``):
  the question, the documents the generator read, the answer it gave (``rejected``) and the
  corrected one (``completion``). Thumbs are stored but make no example here.

Every example carries ``derived_from`` (the feedback ids), ``source`` (``user``/``shadow``, never
mixed within one example), the shadow ``agent_id`` if any, and a ``weight``: 1 for user
feedback, ``confidence × shadow_factor`` for shadow feedback (default factor 0.5, confidence 0.5
when the agent gave none), so a shadow label counts at most half a user's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from shared.errors import ErrorCode, LodestarError
from shared.store import Store

#: Stages ``?stage=`` accepts (those that produce feedback targets).
EXPORT_STAGES: tuple[str, ...] = (
    "decompose",
    "query",
    "retrieve",
    "fusion",
    "rerank",
    "generate",
    "critic",
)
SOURCES: tuple[str, ...] = ("user", "shadow")
EXAMPLE_TYPES: tuple[str, ...] = ("rel_label", "pref_pair", "sft")
RANKING_STAGES = frozenset({"retrieve", "fusion", "rerank"})
POSITIVE_ACTIONS = frozenset({"relevant", "pin"})
NEGATIVE_ACTIONS = frozenset({"irrelevant", "remove"})
SHADOW_FACTOR = 0.5
DEFAULT_NEGATIVES = 5


def parse_since(value: str | None) -> float | None:
    """``since`` as a Unix time: a number of seconds, or an ISO-8601 date/time (UTC when it
    names no zone). Anything else is a 422 on ``since``."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise LodestarError(
                ErrorCode.validation,
                f"since must be a Unix time or an ISO-8601 date/time, got {value!r}",
                field="since",
            ) from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(number) or number < 0:
        raise LodestarError(
            ErrorCode.validation, "since must be a non-negative finite Unix time", field="since"
        )
    return number


def check_filter(value: str | None, allowed: Sequence[str], field: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise LodestarError(
            ErrorCode.validation,
            f"unknown {field} {value!r}; expected one of {', '.join(allowed)}",
            field=field,
        )
    return value


def feedback_weight(row: Mapping[str, Any], shadow_factor: float = SHADOW_FACTOR) -> float:
    if row["source"] != "shadow":
        return 1.0
    confidence = row.get("confidence")
    return round((0.5 if confidence is None else float(confidence)) * shadow_factor, 4)


def _query_of(trace: Mapping[str, Any]) -> str:
    request = trace.get("request") or {}
    return str(request.get("query") or request.get("question") or "")


def stage_ranking(trace: Mapping[str, Any], stage: str) -> list[str]:
    """The doc ids of ``stage``'s hits, best first; several runs of one stage (one per
    retriever, one per round) interleave by rank."""
    ranked: list[tuple[int, int, str]] = []
    for order, run in enumerate(r for r in trace.get("stages", []) if r["stage"] == stage):
        for position, hit in enumerate((run.get("outputs") or {}).get("hits") or []):
            ranked.append((int(hit.get("rank", position + 1)), order, str(hit["doc_id"])))
    return list(dict.fromkeys(doc_id for _, _, doc_id in sorted(ranked)))


def _example(kind: str, row: Mapping[str, Any], trace: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": kind,
        "stage": row["stage"],
        "trace_id": row["trace_id"],
        "source": row["source"],
        "agent_id": row.get("agent_id"),
        "collection": str((trace.get("request") or {}).get("collection") or "wiki"),
    }


def rel_label(
    row: Mapping[str, Any],
    trace: Mapping[str, Any],
    *,
    negatives: int = DEFAULT_NEGATIVES,
    shadow_factor: float = SHADOW_FACTOR,
) -> dict[str, Any]:
    doc_id = str(row["target_id"])
    trace_feedback = trace.get("feedback") or []
    positives = {
        str(f["target_id"])
        for f in trace_feedback
        if f["target_type"] == "doc" and f["action"] in POSITIVE_ACTIONS
    }
    ranking = stage_ranking(trace, row["stage"])
    judged_negative = [
        str(f["target_id"])
        for f in trace_feedback
        if f["target_type"] == "doc"
        and f["action"] in NEGATIVE_ACTIONS
        and f["source"] == row["source"]
    ]
    ordered_negative = sorted(
        set(judged_negative),
        key=lambda d: ranking.index(d) if d in ranking else len(ranking),
    )
    pool = [*ordered_negative, *ranking]
    hard = [d for d in dict.fromkeys(pool) if d != doc_id and d not in positives][:negatives]
    return {
        **_example("rel_label", row, trace),
        "query": _query_of(trace),
        "doc_id": doc_id,
        "label": 1 if row["action"] in POSITIVE_ACTIONS else 0,
        "action": row["action"],
        "rank": ranking.index(doc_id) + 1 if doc_id in ranking else None,
        "hard_negatives": hard,
        "negative_ranks": [ranking.index(d) + 1 if d in ranking else None for d in hard],
        "derived_from": [row["feedback_id"]],
        "weight": feedback_weight(row, shadow_factor),
        "created_at": row["created_at"],
    }


def _subqueries(trace: Mapping[str, Any], stage: str) -> list[dict[str, str]]:
    """The sub-queries ``stage`` produced as ``[{"id", "text"}]`` (``outputs.subqueries`` when
    the stage records them, else its sub-query targets, whose ids are then their text)."""
    found: list[dict[str, str]] = []
    for run in (r for r in trace.get("stages", []) if r["stage"] == stage):
        listed = (run.get("outputs") or {}).get("subqueries")
        if isinstance(listed, list) and listed:
            for item in listed:
                if isinstance(item, dict):
                    sq_id = str(item.get("sq_id") or item.get("id") or item.get("text"))
                    found.append({"id": sq_id, "text": str(item.get("text") or sq_id)})
                else:
                    found.append({"id": str(item), "text": str(item)})
        else:
            for target in run.get("targets") or []:
                if target.get("type") == "subquery":
                    found.append({"id": str(target["id"]), "text": str(target["id"])})
    return list({sq["id"]: sq for sq in found}.values())


def _text_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, Mapping):
        for key in ("text", "answer", "correction", "query"):
            if isinstance(value.get(key), str) and value[key].strip():
                return str(value[key]).strip()
    return None


def apply_subquery_edits(
    original: Sequence[Mapping[str, str]], rows: Iterable[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """The sub-query list after ``rows``' actions, in order: ``edit`` (value: new text, or
    ``{"text"}``), ``add`` (value: text, or ``{"text", "position"?}``), ``delete``, ``reorder``
    (value: the new 0-based position, or ``{"position"}``; ``order`` is read as ``position``,
    the spelling of rerun overrides)."""
    current = [dict(sq) for sq in original]
    for row in rows:
        action, target, value = row["action"], str(row["target_id"]), row.get("value")
        index = next((i for i, sq in enumerate(current) if sq["id"] == target), None)
        if action == "add":
            text = _text_value(value)
            if text:
                position = _position(value) if isinstance(value, Mapping) else None
                item = {"id": f"added:{row['feedback_id']}", "text": text}
                if isinstance(position, int) and 0 <= position <= len(current):
                    current.insert(position, item)
                else:
                    current.append(item)
        elif index is None:
            continue
        elif action == "edit":
            text = _text_value(value)
            if text:
                current[index] = {"id": target, "text": text}
        elif action == "delete":
            current.pop(index)
        elif action == "reorder":
            position = _position(value) if isinstance(value, Mapping) else value
            if isinstance(position, int):
                item = current.pop(index)
                current.insert(max(0, min(position, len(current))), item)
    return current


def _position(value: Mapping[str, Any]) -> Any:
    """The 0-based place a sub-query edit names: ``position``, or ``order`` as reruns spell it."""
    return value.get("position", value.get("order"))


def as_subquery_edit(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored sub-query feedback row in the form rerun overrides take (``action``, ``sq_id``,
    ``text``, ``order``), so stored edits and explicit ones are applied by one rule."""
    value = row.get("value")
    if row["action"] == "reorder":
        order = _position(value) if isinstance(value, Mapping) else value
    else:
        order = _position(value) if isinstance(value, Mapping) else None
    return {
        "action": row["action"],
        "sq_id": None if row["action"] == "add" else str(row["target_id"]),
        "text": _text_value(value),
        "order": order if isinstance(order, int) and order >= 0 else None,
    }


def pref_pair(
    rows: Sequence[Mapping[str, Any]],
    trace: Mapping[str, Any],
    *,
    shadow_factor: float = SHADOW_FACTOR,
) -> dict[str, Any] | None:
    """One preference pair from one source's sub-query feedback on one trace stage."""
    first = rows[0]
    original = _subqueries(trace, first["stage"])
    chosen = apply_subquery_edits(original, rows)
    rejected_texts = [sq["text"] for sq in original]
    chosen_texts = [sq["text"] for sq in chosen]
    if chosen_texts == rejected_texts:
        return None
    return {
        **_example("pref_pair", first, trace),
        "query": _query_of(trace),
        "chosen": chosen_texts,
        "rejected": rejected_texts,
        "actions": [r["action"] for r in rows],
        "derived_from": [r["feedback_id"] for r in rows],
        "weight": min(feedback_weight(r, shadow_factor) for r in rows),
        "created_at": max(r["created_at"] for r in rows),
    }


def sft(
    row: Mapping[str, Any], trace: Mapping[str, Any], *, shadow_factor: float = SHADOW_FACTOR
) -> dict[str, Any] | None:
    generations = [r for r in trace.get("stages", []) if r["stage"] == row["stage"]]
    response = trace.get("response") or {}
    last = (generations[-1].get("outputs") or {}) if generations else {}
    original = str(response.get("answer") or last.get("answer") or "")
    value = row.get("value")
    if row["action"] == "preferred_answer":
        corrected = _text_value(value)
    else:  # correct_span: {"span", "correction"} replaces the span; a bare text replaces all
        span = value.get("span") if isinstance(value, Mapping) else None
        correction = _text_value(value)
        if correction and isinstance(span, str) and span and span in original:
            corrected = original.replace(span, correction, 1)
        else:
            corrected = correction
    if not corrected:
        return None
    doc_ids = (
        list((generations[-1].get("inputs") or {}).get("doc_ids") or []) if generations else []
    )
    return {
        **_example("sft", row, trace),
        "prompt": _query_of(trace),
        "context_doc_ids": doc_ids,
        "rejected": original,
        "completion": corrected,
        "target_type": row["target_type"],
        "target_id": row["target_id"],
        "derived_from": [row["feedback_id"]],
        "weight": feedback_weight(row, shadow_factor),
        "created_at": row["created_at"],
    }


def examples_from_feedback(
    rows: Sequence[Mapping[str, Any]],
    traces: Mapping[str, Mapping[str, Any]],
    *,
    negatives: int = DEFAULT_NEGATIVES,
    shadow_factor: float = SHADOW_FACTOR,
) -> list[dict[str, Any]]:
    """Training examples from feedback ``rows`` (oldest first) and their ``traces``
    (``Store.get_trace`` dicts, which include each trace's feedback)."""
    examples: list[dict[str, Any]] = []
    subquery_groups: dict[tuple[str, str, str, str | None], list[Mapping[str, Any]]] = {}
    for row in rows:
        trace = traces[row["trace_id"]]
        if row["target_type"] == "doc" and row["stage"] in RANKING_STAGES:
            if row["action"] in POSITIVE_ACTIONS | NEGATIVE_ACTIONS:
                examples.append(
                    rel_label(row, trace, negatives=negatives, shadow_factor=shadow_factor)
                )
        elif row["target_type"] == "subquery":
            key = (row["trace_id"], row["stage"], row["source"], row.get("agent_id"))
            subquery_groups.setdefault(key, []).append(row)
        elif row["target_type"] in ("answer", "claim") and row["action"] in (
            "correct_span",
            "preferred_answer",
        ):
            example = sft(row, trace, shadow_factor=shadow_factor)
            if example is not None:
                examples.append(example)
    for group in subquery_groups.values():
        pair = pref_pair(group, traces[group[0]["trace_id"]], shadow_factor=shadow_factor)
        if pair is not None:
            examples.append(pair)
    examples.sort(key=lambda e: (e["created_at"], e["derived_from"][0]))
    return examples


def build_export(
    store: Store,
    *,
    stage: str | None = None,
    source: str | None = None,
    since: float | None = None,
    types: Sequence[str] | None = None,
    negatives: int = DEFAULT_NEGATIVES,
    shadow_factor: float = SHADOW_FACTOR,
) -> list[dict[str, Any]]:
    """The export the API streams, read from the store (also what the offline update reads)."""
    rows = store.list_feedback(stage=stage, source=source, since=since)
    traces = {tid: store.get_trace(tid) for tid in dict.fromkeys(r["trace_id"] for r in rows)}
    examples = examples_from_feedback(
        rows, traces, negatives=negatives, shadow_factor=shadow_factor
    )
    if types is not None:
        examples = [e for e in examples if e["type"] in types]
    return examples


def to_jsonl(examples: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for example in examples:
        yield json.dumps(example, ensure_ascii=False, sort_keys=True) + "\n"
