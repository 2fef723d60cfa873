"""Rerun a stored trace from one of its stages, with feedback applied (NExT-Search online mode).

A rerun makes a new trace whose ``parent_trace_id`` is the old one. Every stage upstream of
``from_stage`` is copied from the parent (its persisted output, marked ``copied_from`` in
``params``), never recomputed; ``from_stage`` and everything after it run again:

- a ``/search`` trace: ``retrieve`` (the whole pipeline again: the only rerun where relevance
  labels can move the query, Rocchio and RM3), ``fusion`` (the parent's ranked lists fused
  again, then re-ranked when the search re-ranked: no retrieval call), ``rerank`` (the parent's
  fused list re-ranked again: no retrieval call);
- an ``/answer`` trace: ``decompose`` (round 1's sub-queries edited — ``overrides.subqueries``
  — then the loop again; a sub-query whose text is unchanged reuses the parent's retrieval for
  it, so only edited and added ones are searched), ``retrieve`` (the parent's sub-queries, the
  multi-round loop again, every round's search adapted) or ``generate`` (one answer from the
  documents the parent's last answer read, with pins first and removals out: no retrieval
  call).

Pins and removals apply at whatever stage the rerun starts from; judged documents are marked.
Plain Python over the pipelines: the API loads traces and feedback and calls this.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.adapt import AdaptationWeights, FeedbackAdaptation
from services.orchestrator.decompose import Decomposition, SubQuery, sq_id, sq_number
from services.orchestrator.feedback_export import as_subquery_edit
from services.orchestrator.prompts import build_answer_messages
from services.orchestrator.rounds import AnswerPipeline, RoundRecord, RoundsOutcome
from services.orchestrator.search import SearchOutcome, SearchPipeline
from shared.errors import ErrorCode, LodestarError
from shared.schemas import Hit, SourceRank
from shared.store import StageRun, Store, Trace

#: The stages a rerun may start from, per trace kind, in pipeline order.
RERUN_STAGES: dict[str, tuple[str, ...]] = {
    "search": ("retrieve", "fusion", "rerank"),
    "answer": ("decompose", "retrieve", "generate"),
}
#: What is copied (upstream) for each starting stage.
_UPSTREAM: dict[str, dict[str, tuple[str, ...]]] = {
    "search": {
        "retrieve": (),
        "fusion": ("adapt", "retrieve"),
        "rerank": ("adapt", "retrieve", "fusion", "lookup"),
    },
    "answer": {
        "decompose": (),
        "retrieve": (),
        "generate": ("adapt", "retrieve", "fusion", "lookup", "rerank"),
    },
}
#: How far up the parent chain feedback is collected (a rerun of a rerun keeps earlier pins).
MAX_LINEAGE = 32


@dataclass
class Overrides:
    pin: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    relevant: list[str] = field(default_factory=list)
    irrelevant: list[str] = field(default_factory=list)
    subqueries: list[dict[str, Any]] | None = None


def _invalid(message: str, field_name: str) -> LodestarError:
    return LodestarError(ErrorCode.validation, message, field=field_name)


def query_key(text: str) -> str:
    """The form two queries must share for a session's pins and removals to carry over."""
    return " ".join(re.findall(r"\w+", text.lower()))


def trace_query(trace: Mapping[str, Any]) -> str:
    request = trace.get("request") or {}
    return str(request.get("query") or request.get("question") or "")


def trace_documents(traces: Iterable[Mapping[str, Any]]) -> dict[str, Hit]:
    """doc id -> title, text and passage number, from the retrieve and ``lookup`` stages of
    ``traces`` (the first seen with a text wins). A document that a retriever listed past the
    ``text_k`` it was asked with, and that no lookup fetched, is kept with an empty text: a
    search that shows or ranks it looks the text up (``SearchPipeline.with_texts``)."""
    documents: dict[str, Hit] = {}
    for trace in traces:
        for stage in trace.get("stages", []):
            if stage["stage"] == "retrieve":
                rows = stage["outputs"].get("hits", [])
            elif stage["stage"] == "lookup":
                rows = stage["outputs"].get("documents", [])
            else:
                continue
            for row in rows:
                known = documents.get(row["doc_id"])
                if "text" in row and (known is None or (not known.text and row["text"])):
                    documents[row["doc_id"]] = Hit(
                        doc_id=row["doc_id"],
                        title=row.get("title", ""),
                        text=row["text"],
                        score=float(row.get("score", 0.0)),
                        passage=row.get("passage"),
                    )
    return documents


def trace_doc_ids(trace: Mapping[str, Any]) -> set[str]:
    """Every document any stage of ``trace`` produced or read."""
    ids: set[str] = set()
    for stage in trace.get("stages", []):
        ids.update(
            t["id"] for t in stage.get("targets", []) if t.get("type") in ("doc", "citation")
        )
        ids.update(row["doc_id"] for row in stage.get("outputs", {}).get("hits", []) or [])
        ids.update(stage.get("inputs", {}).get("doc_ids", []) or [])
    return ids


def check_rerun(
    trace: Mapping[str, Any], from_stage: str, overrides: Overrides, known_docs: set[str]
) -> None:
    """422s, typed: a stage the trace lacks or a rerun cannot start from, override ids the
    trace does not contain, contradictory overrides, sub-query edits without sub-queries."""
    kind = str(trace["kind"])
    present = [s["stage"] for s in trace.get("stages", [])]
    if from_stage not in present:
        have = ", ".join(dict.fromkeys(present)) or "none"
        raise _invalid(f"trace has no {from_stage!r} stage (it has: {have})", "from_stage")
    allowed = RERUN_STAGES.get(kind, ())
    if from_stage not in allowed:
        raise _invalid(
            f"a {kind} trace can be rerun from {', '.join(allowed) or 'no stage'}, "
            f"not {from_stage!r}",
            "from_stage",
        )
    for name in ("pin", "remove", "relevant", "irrelevant"):
        unknown = [d for d in getattr(overrides, name) if d not in known_docs]
        if unknown:
            raise _invalid(
                f"document {unknown[0]!r} is not in this trace's stages", f"overrides.{name}"
            )
    if set(overrides.pin) & set(overrides.remove):
        raise _invalid("a document cannot be both pinned and removed", "overrides.pin")
    if set(overrides.relevant) & set(overrides.irrelevant):
        raise _invalid("a document cannot be both relevant and irrelevant", "overrides.relevant")
    if overrides.subqueries is not None:
        if from_stage != "decompose":
            raise _invalid(
                "sub-query edits rerun from the decompose stage: set from_stage to 'decompose'",
                "overrides.subqueries",
            )
        edit_subqueries(first_subqueries(trace), overrides.subqueries)


def first_subqueries(trace: Mapping[str, Any]) -> list[SubQuery]:
    """Round 1's sub-queries, from the trace's first ``decompose`` stage (none: ``[]``)."""
    for stage in trace.get("stages", []):
        if stage["stage"] == "decompose" and stage.get("params", {}).get("round", 1) == 1:
            return [SubQuery(**row) for row in stage["outputs"].get("subqueries", [])]
    return []


def edit_subqueries(
    parent: Sequence[SubQuery], edits: Sequence[Mapping[str, Any]], *, strict: bool = True
) -> Decomposition:
    """Round 1's sub-queries after ``edits``, applied in order: ``edit`` (new ``text`` for
    ``sq_id``), ``add`` (``text`` at position ``order``, default last, with a new id after every
    id the trace used), ``delete`` (``sq_id``), ``reorder`` (``sq_id`` moved to ``order``).
    Ids stay stable, so feedback on a kept sub-query still names it. ``strict`` (explicit
    overrides): 422 for an unknown id, an empty text, a repeated text or no sub-query left.
    Not strict (stored feedback, given over time by several hands): an edit that cannot stand
    is skipped, and edits that would leave nothing are ignored."""
    if not strict:
        kept: list[Mapping[str, Any]] = []
        for edit in edits:
            try:
                edit_subqueries(parent, [*kept, edit])
            except LodestarError:
                continue
            kept.append(edit)
        return edit_subqueries(parent, kept) if kept else Decomposition(list(parent))
    field_name = "overrides.subqueries"
    current = list(parent)
    next_number = max((sq_number(sq.sq_id) for sq in parent), default=0) + 1

    def position(sub_query_id: Any, action: str) -> int:
        for index, sq in enumerate(current):
            if sq.sq_id == sub_query_id:
                return index
        if sub_query_id is None:
            raise _invalid(f"a sub-query {action} needs sq_id", field_name)
        raise _invalid(f"sub-query {sub_query_id!r} is not in this trace's round 1", field_name)

    def new_text(edit: Mapping[str, Any]) -> str:
        text = " ".join(str(edit.get("text") or "").split())
        if not text:
            raise _invalid(f"a sub-query {edit['action']} needs a non-empty text", field_name)
        return text

    for edit in edits:
        action = edit["action"]
        order = edit.get("order")
        if action == "add":
            added = SubQuery(sq_id(next_number), new_text(edit), 0, 1, "user")
            next_number += 1
            current.insert(len(current) if order is None else min(order, len(current)), added)
        elif action == "edit":
            index = position(edit.get("sq_id"), action)
            current[index] = dataclasses.replace(current[index], text=new_text(edit), origin="user")
        elif action == "delete":
            del current[position(edit.get("sq_id"), action)]
        else:  # reorder
            moved = current.pop(position(edit.get("sq_id"), action))
            current.insert(len(current) if order is None else min(order, len(current)), moved)
    if not current:
        raise _invalid("the edits leave no sub-query to search for", field_name)
    if len({sq.text.lower() for sq in current}) < len(current):
        raise _invalid("two sub-queries have the same text", field_name)
    return Decomposition([dataclasses.replace(sq, order=index) for index, sq in enumerate(current)])


def reuse_retrieval(parent: Mapping[str, Any]) -> Callable[[Trace, SubQuery], SearchOutcome | None]:
    """The parent's round-1 retrieval for a sub-query whose id and text it shares: its stages
    copied into the rerun's trace and its result list, so an unchanged sub-query costs no
    retrieval call."""
    texts = {sq.sq_id: sq.text for sq in first_subqueries(parent)}
    documents = trace_documents([parent])

    def reuse(trace: Trace, sq: SubQuery) -> SearchOutcome | None:
        if texts.get(sq.sq_id) != sq.text:
            return None
        stages = [
            s
            for s in parent.get("stages", [])
            if s.get("params", {}).get("sq_id") == sq.sq_id
            and (s["outputs"].get("hits") or s["outputs"].get("documents"))
        ]
        ranked = [s for s in stages if s["outputs"].get("hits")]
        if not ranked:
            return None
        for stage in stages:  # the lookups too: the texts the reused list was given
            trace.stages.append(copied_stage(stage))
        return SearchOutcome(hits=stage_hits(ranked[-1], documents), timings_ms={})

    return reuse


def stored_subquery_edits(
    trace: Mapping[str, Any], sources: Sequence[str] = ("user",)
) -> list[dict[str, Any]]:
    """The sub-query feedback stored on ``trace`` itself, oldest first, as rerun edits. Only the
    trace's own: a rerun's decomposition already carries the edits its parent was given."""
    return [
        as_subquery_edit(row)
        for row in feedback_rows([trace], sources)
        if row.get("target_type") == "subquery"
    ]


def was_edited(trace: Mapping[str, Any]) -> bool:
    """Whether ``trace`` is a rerun whose round-1 sub-queries came from edits (overrides or
    stored feedback) rather than from decomposing the question."""
    rerun = (trace.get("request") or {}).get("rerun") or {}
    explicit = (rerun.get("overrides") or {}).get("subqueries")
    return bool(explicit or (rerun.get("adaptation") or {}).get("subquery_feedback"))


def lineage(store: Store, trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``trace`` and its ancestors (``parent_trace_id``), oldest first."""
    chain = [dict(trace)]
    seen = {trace["trace_id"]}
    parent = trace.get("parent_trace_id")
    while parent and parent not in seen and len(chain) < MAX_LINEAGE:
        seen.add(parent)
        try:
            ancestor = store.get_trace(parent)
        except LodestarError:
            break
        chain.append(ancestor)
        parent = ancestor.get("parent_trace_id")
    return chain[::-1]


def feedback_rows(
    traces: Iterable[Mapping[str, Any]], sources: Sequence[str] = ("user",)
) -> list[dict[str, Any]]:
    """The traces' feedback from ``sources``, oldest first."""
    rows = [dict(f) for t in traces for f in t.get("feedback", []) if f.get("source") in sources]
    return sorted(rows, key=lambda f: float(f.get("created_at") or 0.0))


def rerun_adaptation(
    store: Store,
    trace: Mapping[str, Any],
    overrides: Overrides,
    *,
    apply_feedback: bool,
    sources: Sequence[str] = ("user",),
    weights: AdaptationWeights | None = None,
) -> FeedbackAdaptation:
    """The overrides on top of (when ``apply_feedback``) the feedback stored on the trace and
    its ancestors. Synchronous (store reads): run it in a thread from async code."""
    chain = lineage(store, trace)
    rows = feedback_rows(chain, sources) if apply_feedback else []
    return FeedbackAdaptation.from_feedback(
        rows,
        pins=overrides.pin,
        removes=overrides.remove,
        relevant=overrides.relevant,
        irrelevant=overrides.irrelevant,
        documents=trace_documents(reversed(chain)),
        weights=weights,
    )


def session_adaptation(
    store: Store,
    session_id: str,
    query: str,
    *,
    sources: Sequence[str] = ("user",),
    weights: AdaptationWeights | None = None,
) -> FeedbackAdaptation:
    """The session rule: feedback given earlier in ``session_id`` applies to a new search —
    ``pin``/``remove`` from the session's traces of the *same* query (compared case- and
    punctuation-insensitively), ``relevant``/``irrelevant`` from *any* of its traces (a
    relevance judgment describes the session's information need; a pin is an answer to one
    query). Latest feedback wins per document. Synchronous (store reads)."""
    traces = [store.get_trace(t) for t in store.session_traces(session_id)]
    key = query_key(query)
    rows = []
    for trace in traces:
        same_query = query_key(trace_query(trace)) == key
        for row in feedback_rows([trace], sources):
            if row.get("action") in ("pin", "remove") and not same_query:
                continue
            rows.append(row)
    rows.sort(key=lambda f: float(f.get("created_at") or 0.0))
    return FeedbackAdaptation.from_feedback(
        rows, documents=trace_documents(reversed(traces)), weights=weights
    )


def copied_stage(stage: Mapping[str, Any]) -> StageRun:
    """A persisted stage as a new run of this trace, marked ``copied_from`` its original."""
    return StageRun(
        stage=stage["stage"],
        inputs=copy.deepcopy(stage["inputs"]),
        outputs=copy.deepcopy(stage["outputs"]),
        targets=copy.deepcopy(stage["targets"]),
        model_id=stage.get("model_id"),
        params={**stage.get("params", {}), "copied_from": stage["stage_run_id"]},
        latency_ms=float(stage.get("latency_ms") or 0.0),
    )


def copy_stages(trace: Trace, parent: Mapping[str, Any], names: Sequence[str]) -> None:
    """Append the parent's stages named ``names`` (in the parent's order) to ``trace``."""
    for stage in parent.get("stages", []):
        if stage["stage"] in names:
            trace.stages.append(copied_stage(stage))


def retrieved_lists(parent: Mapping[str, Any]) -> dict[str, list[Hit]]:
    """retriever -> its ranked list, rebuilt from the parent's retrieve stages."""
    results: dict[str, list[Hit]] = {}
    for stage in parent.get("stages", []):
        if stage["stage"] != "retrieve":
            continue
        retriever = str(stage["params"].get("retriever"))
        rows = stage["outputs"].get("hits", [])
        if rows and "text" not in rows[0]:
            raise _invalid(
                "this trace's retrieve stage predates stored hit texts: rerun from retrieve",
                "from_stage",
            )
        results[retriever] = [
            Hit(
                doc_id=row["doc_id"],
                title=row.get("title", ""),
                text=row.get("text", ""),
                score=float(row["score"]),
                sources={retriever: SourceRank(rank=int(row["rank"]), score=float(row["score"]))},
                passage=row.get("passage"),
            )
            for row in rows
        ]
    return results


def fused_list(parent: Mapping[str, Any], documents: Mapping[str, Hit]) -> list[Hit]:
    """The parent's fused list (its last fusion stage) with texts from its retrieve and lookup
    stages."""
    stages = [s for s in parent.get("stages", []) if s["stage"] == "fusion"]
    if not stages:
        raise _invalid("trace has no fusion stage to re-rank", "from_stage")
    return stage_hits(stages[-1], documents)


def stage_hits(stage: Mapping[str, Any], documents: Mapping[str, Hit]) -> list[Hit]:
    """A persisted stage's ranked hits with their texts from the retrieve and lookup stages
    (``""`` for one that only a retriever past ``text_k`` listed: ``rank`` looks it up)."""
    hits = []
    for row in stage["outputs"].get("hits", []):
        doc = documents.get(row["doc_id"])
        if doc is None:
            raise _invalid(
                f"no stored text for {row['doc_id']!r}: rerun from retrieve", "from_stage"
            )
        hits.append(
            doc.model_copy(
                update={
                    "score": float(row["score"]),
                    "sources": {
                        name: SourceRank.model_validate(source)
                        for name, source in (row.get("sources") or {}).items()
                    },
                }
            )
        )
    return hits


def new_trace(parent: Mapping[str, Any], request_update: Mapping[str, Any]) -> Trace:
    return Trace(
        kind=str(parent["kind"]),
        request={**(parent.get("request") or {}), **request_update},
        session_id=parent.get("session_id"),
        parent_trace_id=str(parent["trace_id"]),
    )


async def rerun_search(
    pipeline: SearchPipeline,
    parent: Mapping[str, Any],
    trace: Trace,
    *,
    from_stage: str,
    adaptation: FeedbackAdaptation,
    k: int,
) -> SearchOutcome:
    """Rerun a ``/search`` trace into ``trace`` (a ``new_trace`` of it)."""
    request = parent.get("request") or {}
    query = str(request["query"])
    rerank = request.get("rerank")
    if from_stage == "retrieve":
        return await pipeline.run(
            trace,
            query=query,
            collection=str(request.get("collection", "wiki")),
            k=k,
            retrievers=list(request.get("retrievers") or ()),
            rerank=rerank,
            adaptation=adaptation,
        )
    copy_stages(trace, parent, _UPSTREAM["search"][from_stage])
    response = parent.get("response") or {}
    degraded = [d for d in response.get("degraded", []) if d not in ("reranker", "adaptation")]
    results = retrieved_lists(parent)
    fused = fused_list(parent, trace_documents([parent])) if from_stage == "rerank" else None
    # Texts the parent's retrievers did not send (past ``text_k``) are looked up in ``rank``
    # for the hits it keeps: a lookup, not a retrieval call.
    return await pipeline.rank(
        trace,
        query=query,
        collection=str(request.get("collection", "wiki")),
        results=results,
        k=k,
        rerank=rerank,
        adaptation=adaptation,
        degraded=degraded,
        fused=fused,
    )


def parent_max_rounds(parent: Mapping[str, Any]) -> int:
    """The parent's ``max_rounds``; when it left the default to the server (``None``), the
    number of rounds it ran (at least 1)."""
    asked = (parent.get("request") or {}).get("max_rounds")
    if asked:
        return int(asked)
    return max(1, len((parent.get("response") or {}).get("rounds") or []))


async def rerun_answer(
    pipeline: AnswerPipeline,
    parent: Mapping[str, Any],
    trace: Trace,
    *,
    from_stage: str,
    adaptation: FeedbackAdaptation,
    k: int,
    subquery_edits: Sequence[Mapping[str, Any]] | None = None,
    stored_edits: Sequence[Mapping[str, Any]] | None = None,
) -> RoundsOutcome:
    """Rerun an ``/answer`` trace into ``trace``: the loop over edited sub-queries
    (``decompose``), the loop with adapted searches (``retrieve``), or one answer over the
    parent's documents (``generate``). ``subquery_edits`` (the request's overrides) are held
    to :func:`edit_subqueries`' strict rule; ``stored_edits`` (feedback, ``None`` when the rerun
    does not apply it) apply only when the request names none, and any that cannot stand are
    skipped. Applying feedback also keeps a decomposition that earlier edits made, rather than
    decomposing the question afresh."""
    request = parent.get("request") or {}
    question = str(request["question"])
    if from_stage in ("decompose", "retrieve"):
        parent_subqueries = first_subqueries(parent)
        given = None
        if subquery_edits is not None:
            given = edit_subqueries(parent_subqueries, subquery_edits)
        elif (
            stored_edits is not None and parent_subqueries and (stored_edits or was_edited(parent))
        ):
            given = edit_subqueries(parent_subqueries, stored_edits, strict=False)
        elif from_stage == "retrieve" and parent_subqueries:
            given = Decomposition(parent_subqueries)  # upstream of retrieve: copied, not redone
        # Feedback moves the query or the list, and another k another depth: search again.
        same_search = adaptation.empty and k == int(request.get("k", 10))
        adapted = copy.copy(pipeline)
        adapted.search = pipeline.search.adapted(adaptation)
        return await adapted.run_rounds(
            trace,
            question=question,
            collection=str(request.get("collection", "wiki")),
            k=k,
            max_rounds=parent_max_rounds(parent),
            subqueries=request.get("subqueries"),
            given=given,
            reuse=reuse_retrieval(parent) if from_stage == "decompose" and same_search else None,
        )
    copy_stages(trace, parent, _UPSTREAM["answer"][from_stage])
    generates = [s for s in parent.get("stages", []) if s["stage"] == "generate"]
    documents = trace_documents([parent])
    read = [documents[d] for d in generates[-1]["inputs"].get("doc_ids", []) if d in documents]
    degraded: list[str] = []
    hits = await pipeline.search.with_texts(  # a pin the parent saw only past ``text_k``
        trace, str(request.get("collection", "wiki")), adaptation.apply(read), {}, degraded
    )
    generator = pipeline.generator_factory()
    generation = await asyncio.to_thread(
        generator.generate,
        build_answer_messages(question, hits),
        max_new_tokens=pipeline.max_new_tokens,
    )
    outcome = pipeline.finish(trace, question, SearchOutcome(hits=hits, timings_ms={}), generation)
    record = RoundRecord(
        round=1,
        query=question,
        hits=hits,
        context="",
        answer=outcome.answer,
        rationale="",
        raw=outcome.raw_answer,
        generation=generation,
        timings_ms=dict(outcome.timings_ms),
    )
    return RoundsOutcome(
        answer=outcome.answer,
        rounds=[record],
        citations=outcome.citations,
        stop_reason="rerun_generate",
        timings_ms=dict(outcome.timings_ms),
        degraded=degraded,
    )


class FeedbackMetrics:
    """Prometheus counters on the orchestrator's ``/metrics``: reruns by starting stage and
    trace kind, and online adaptation events by trigger (``rerun``/``session``) and effect."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.reruns = Counter(
            "orchestrator_reruns",
            "Traces rerun, by the stage the rerun started from",
            ("from_stage", "kind"),
            registry=registry,
        )
        self.adaptations = Counter(
            "orchestrator_online_adaptations",
            "Searches that applied feedback online, by trigger and effect",
            ("trigger", "effect"),
            registry=registry,
        )

    def adapted(self, trigger: str, adaptation: FeedbackAdaptation) -> None:
        for effect, ids in (
            ("pin", adaptation.pins),
            ("remove", adaptation.removes),
            ("relevant", adaptation.relevant),
            ("irrelevant", adaptation.irrelevant),
        ):
            if ids:
                self.adaptations.labels(trigger, effect).inc()
