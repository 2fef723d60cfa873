"""What the debug pages show, computed from a stored trace (``Store.get_trace``'s dict).

Plain functions, no FastAPI and no HTML: the router hands their results to the templates, and
tests can call them directly. Nothing here recomputes a stage; it only reads what the stages
persisted (the rerun module's readers are reused for document texts and rerun stages).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.rerun import RERUN_STAGES, trace_documents

#: One line per score, shown beside it: what the number is and what it can be compared with
#: (people keep asking whether a BM25 12.3 beats a cosine 0.71; it neither beats nor loses).
SCORE_DEFINITIONS: dict[str, str] = {
    "dense": "cosine similarity of the query's and the passage's MiniLM embeddings "
    "(-1 to 1, higher is closer); comparable across queries",
    "bm25": "BM25 term-match score (IDF-weighted, length-normalised term counts); unbounded, "
    "comparable only within one query",
    "fm": "SEAL n-gram score from the FM-index (sum of the generated n-grams' weights); "
    "comparable only within one query",
    "dsi": "DSI generative retrieval: the model's log-probability of the docid (higher is "
    "likelier, at most 0)",
    "rrf": "reciprocal rank fusion: the sum over lists of 1 / (rrf_k + rank); only ranks "
    "enter it, so raw scores of different retrievers never mix",
    "rerank": "the reranker's own relevance score for the method named in the card "
    "(cosine, ICR attention mass, cross-encoder logit); comparable only within one list",
}

#: The order stages run in (a trace stores them in the order they ran; this is for the legend).
PIPELINE_ORDER = (
    "decompose",
    "adapt",
    "retrieve",
    "fusion",
    "lookup",
    "rerank",
    "generate",
    "critic",
    "query",
    "round",
    "select",
)


def element_id(*parts: str) -> str:
    """An HTML id for a feedback target (doc ids hold spaces and punctuation)."""
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
    return f"t-{digest}"


def doc_anchor(doc_id: str) -> str:
    return element_id("doc", doc_id)


@dataclass
class FeedbackRow:
    action: str
    value: str
    source: str
    agent_id: str | None
    confidence: float | None
    rationale: str | None
    stage: str
    target_type: str
    target_id: str


@dataclass
class Target:
    """One thing feedback can point at (a document of one stage, a sub-query, the answer)."""

    stage: str
    target_type: str
    target_id: str
    actions: tuple[str, ...]
    feedback: list[FeedbackRow] = field(default_factory=list)
    error: str | None = None

    @property
    def element_id(self) -> str:
        return element_id(self.stage, self.target_type, self.target_id)


@dataclass
class HitRow:
    rank: int
    doc_id: str
    title: str
    score: float | None
    sources: dict[str, dict[str, float]]
    """Per retriever (or sub-query): its rank and raw score."""
    fused_rank: int | None
    fused_score: float | None
    target: Target
    judged: str | None = None


@dataclass
class StageCard:
    index: int
    stage: str
    stage_run_id: str
    model_id: str | None
    latency_ms: float
    start_ms: float
    inputs: dict[str, str]
    params: dict[str, str]
    copied_from: str | None
    title: str
    definition: str | None = None
    hits: list[HitRow] = field(default_factory=list)
    rerank_input: list[str] = field(default_factory=list)
    rerank_output: list[str] = field(default_factory=list)
    subqueries: list[tuple[dict[str, Any], Target]] = field(default_factory=list)
    answer: dict[str, Any] | None = None
    answer_target: Target | None = None
    citations: list[Target] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    rerunnable: bool = False
    other_targets: list[Target] = field(default_factory=list)
    """Targets the card's own sections do not show (the critic's and select's answer)."""

    @property
    def anchor(self) -> str:
        return f"stage-{self.index}"


@dataclass
class Passage:
    doc_id: str
    title: str
    text: str

    @property
    def anchor(self) -> str:
        return doc_anchor(self.doc_id)


@dataclass
class TraceView:
    trace: dict[str, Any]
    cards: list[StageCard]
    total_ms: float
    passages: list[Passage]
    user_feedback: list[FeedbackRow]
    shadow_feedback: list[FeedbackRow]
    rounds: list[dict[str, Any]]
    ranking: list[str]
    rerun_stages: tuple[str, ...]

    @property
    def query(self) -> str:
        request = self.trace.get("request") or {}
        return str(request.get("query") or request.get("question") or "")


DOC_ACTIONS = ("relevant", "irrelevant", "pin", "remove")
SUBQUERY_ACTIONS = ("edit", "add", "delete", "reorder")
ANSWER_ACTIONS = ("thumbs", "flag_hallucination", "correct_span")
CITATION_ACTIONS = ("good_citation", "bad_citation")


def show_value(value: Any, limit: int = 300) -> str:
    """A stored value as one short line (JSON for structures, cut at ``limit``)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def feedback_row(row: Mapping[str, Any]) -> FeedbackRow:
    return FeedbackRow(
        action=str(row["action"]),
        value=show_value(row.get("value")),
        source=str(row.get("source") or "user"),
        agent_id=row.get("agent_id"),
        confidence=row.get("confidence"),
        rationale=row.get("rationale"),
        stage=str(row["stage"]),
        target_type=str(row["target_type"]),
        target_id=str(row["target_id"]),
    )


def make_target(trace: Mapping[str, Any], stage: str, target_type: str, target_id: str) -> Target:
    """A target with the user feedback stored on it (shadow feedback is listed apart)."""
    actions = {
        "doc": DOC_ACTIONS,
        "subquery": SUBQUERY_ACTIONS,
        "answer": ANSWER_ACTIONS,
        "citation": CITATION_ACTIONS,
    }.get(target_type, ())
    rows = [
        feedback_row(f)
        for f in trace.get("feedback", [])
        if f["stage"] == stage
        and f["target_type"] == target_type
        and f["target_id"] == target_id
        and f.get("source", "user") == "user"
    ]
    return Target(stage, target_type, target_id, actions, rows)


def _fused_positions(stages: Sequence[Mapping[str, Any]]) -> dict[str | None, dict[str, Any]]:
    """sub-query id (``None`` for a plain search) -> doc id -> (rank, score) in that fusion."""
    found: dict[str | None, dict[str, Any]] = {}
    for stage in stages:
        if stage["stage"] != "fusion" or stage["params"].get("over") == "subqueries":
            continue
        found[stage["params"].get("sq_id")] = {
            row["doc_id"]: (int(row["rank"]), float(row["score"]))
            for row in stage["outputs"].get("hits", [])
        }
    return found


def _hit_rows(
    trace: Mapping[str, Any],
    stage: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    documents: Mapping[str, Any],
    fused: Mapping[str, Any] | None,
    judged: Mapping[str, str],
) -> list[HitRow]:
    result = []
    for i, row in enumerate(rows, 1):
        doc_id = str(row["doc_id"])
        position = (fused or {}).get(doc_id)
        doc = documents.get(doc_id)
        result.append(
            HitRow(
                rank=int(row.get("rank", i)),
                doc_id=doc_id,
                title=str(row.get("title") or (doc.title if doc else "")),
                score=None if row.get("score") is None else float(row["score"]),
                sources={
                    name: {"rank": int(s["rank"]), "score": float(s["score"])}
                    for name, s in (row.get("sources") or {}).items()
                },
                fused_rank=position[0] if position else None,
                fused_score=position[1] if position else None,
                target=make_target(trace, stage["stage"], "doc", doc_id),
                judged=judged.get(doc_id),
            )
        )
    return result


def _flat(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, str]:
    omitted = set(skip)
    return {k: show_value(v) for k, v in values.items() if k not in omitted}


def stage_cards(trace: Mapping[str, Any]) -> list[StageCard]:
    """One card per stored stage, in the order the stages ran."""
    stages = list(trace.get("stages", []))
    documents = trace_documents([trace])
    fused_by_sq = _fused_positions(stages)
    judged: dict[str, str] = dict((trace.get("response") or {}).get("judged") or {})
    allowed = RERUN_STAGES.get(str(trace.get("kind")), ())
    cards: list[StageCard] = []
    clock = 0.0
    for index, stage in enumerate(stages):
        name = str(stage["stage"])
        params = dict(stage.get("params") or {})
        outputs = dict(stage.get("outputs") or {})
        latency = float(stage.get("latency_ms") or 0.0)
        card = StageCard(
            index=index,
            stage=name,
            stage_run_id=str(stage["stage_run_id"]),
            model_id=stage.get("model_id"),
            latency_ms=latency,
            start_ms=clock,
            inputs=_flat(stage.get("inputs") or {}),
            params=_flat(params, skip=("copied_from",)),
            copied_from=params.get("copied_from"),
            title=name,
            rerunnable=name in allowed,
        )
        clock += latency
        hits = outputs.get("hits") or []
        if name == "retrieve":
            retriever = str(params.get("retriever"))
            card.title = f"retrieve · {retriever}"
            card.definition = SCORE_DEFINITIONS.get(retriever)
            fused = fused_by_sq.get(params.get("sq_id"))
            card.hits = _hit_rows(trace, stage, hits, documents, fused, judged)
        elif name == "fusion":
            card.title = "fusion · " + (
                "over sub-queries" if params.get("over") == "subqueries" else "over retrievers"
            )
            card.definition = SCORE_DEFINITIONS["rrf"].replace(
                "rrf_k", f"rrf_k = {params.get('rrf_k')}"
            )
            card.hits = _hit_rows(trace, stage, hits, documents, None, judged)
        elif name == "rerank":
            card.title = f"rerank · {params.get('method')}"
            card.definition = SCORE_DEFINITIONS["rerank"]
            card.rerank_input = [str(d) for d in (stage.get("inputs") or {}).get("doc_ids", [])]
            card.rerank_output = [str(h["doc_id"]) for h in hits]
            # A failed rerank stored no output; its candidates are still feedback targets.
            rows = hits or [{"doc_id": d, "rank": i} for i, d in enumerate(card.rerank_input, 1)]
            card.hits = _hit_rows(trace, stage, rows, documents, None, judged)
            card.details = _flat(outputs, skip=("hits",))
        elif name == "decompose":
            card.subqueries = [
                (sq, make_target(trace, name, "subquery", str(sq["sq_id"])))
                for sq in outputs.get("subqueries", [])
            ]
            card.details = _flat(outputs, skip=("subqueries",))
        elif name == "generate":
            card.title = f"generate · round {params.get('round', 1)}"
            card.answer = outputs
            card.answer_target = make_target(trace, name, "answer", "answer")
            card.citations = [
                make_target(trace, name, "citation", str(d)) for d in outputs.get("citations", [])
            ]
            card.details = _flat(outputs, skip=("answer", "rationale", "citations"))
        else:
            card.details = _flat(outputs)
        shown = {(r.target.target_type, r.target.target_id) for r in card.hits}
        shown |= {(t.target_type, t.target_id) for _, t in card.subqueries}
        shown |= {(t.target_type, t.target_id) for t in card.citations}
        if card.answer_target is not None:
            shown.add(("answer", "answer"))
        card.other_targets = [
            make_target(trace, name, str(t["type"]), str(t["id"]))
            for t in stage.get("targets", [])
            if (t["type"], t["id"]) not in shown
        ]
        cards.append(card)
    return cards


def ranking(trace: Mapping[str, Any]) -> list[str]:
    """The documents the trace returned, in order: a search's hits; an answer's documents read
    (every round's new hits, in round order)."""
    response = trace.get("response") or {}
    if trace.get("kind") == "search":
        return [str(d) for d in response.get("hit_ids", [])]
    return [str(d) for r in response.get("rounds", []) for d in r.get("hit_ids", [])]


def trace_view(trace: dict[str, Any]) -> TraceView:
    cards = stage_cards(trace)
    documents = trace_documents([trace])
    feedback = [feedback_row(f) for f in trace.get("feedback", [])]
    return TraceView(
        trace=trace,
        cards=cards,
        total_ms=sum(c.latency_ms for c in cards),
        passages=[Passage(d.doc_id, d.title, d.text) for d in documents.values()],
        user_feedback=[f for f in feedback if f.source == "user"],
        shadow_feedback=[f for f in feedback if f.source != "user"],
        rounds=list((trace.get("response") or {}).get("rounds", [])),
        ranking=ranking(trace),
        rerun_stages=RERUN_STAGES.get(str(trace.get("kind")), ()),
    )


def find_target(
    trace: Mapping[str, Any], stage: str, target_type: str, target_id: str
) -> Target | None:
    """The target as it is on the page, or ``None`` when no stage of that name produced it."""
    for run in trace.get("stages", []):
        if run["stage"] != stage:
            continue
        if any(t["type"] == target_type and t["id"] == target_id for t in run["targets"]):
            return make_target(trace, stage, target_type, target_id)
    return None


# --- parent vs child ---------------------------------------------------------------------------


@dataclass
class RankedDoc:
    doc_id: str
    rank: int
    status: str
    """``moved`` (with ``delta``), ``same``, ``new`` (child only) or ``gone`` (parent only)."""
    delta: int = 0


def compare_rankings(
    parent: Sequence[str], child: Sequence[str]
) -> tuple[list[RankedDoc], list[RankedDoc]]:
    """Both rankings, each document marked against the other list (``delta`` > 0: moved up)."""
    parent_rank = {d: i for i, d in enumerate(parent, 1)}
    child_rank = {d: i for i, d in enumerate(child, 1)}
    left = [
        RankedDoc(d, i, "same" if d in child_rank else "gone", 0) for i, d in enumerate(parent, 1)
    ]
    for doc in left:
        if doc.status == "same" and child_rank[doc.doc_id] != doc.rank:
            doc.status = "moved"
            doc.delta = doc.rank - child_rank[doc.doc_id]
    right = []
    for i, d in enumerate(child, 1):
        if d not in parent_rank:
            right.append(RankedDoc(d, i, "new"))
        elif parent_rank[d] != i:
            right.append(RankedDoc(d, i, "moved", parent_rank[d] - i))
        else:
            right.append(RankedDoc(d, i, "same"))
    return left, right


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """(op, text) pieces, op one of ``same``, ``del``, ``ins``: ``old`` turned into ``new``."""
    a, b = old.split(), new.split()
    pieces: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            pieces.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            pieces.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            pieces.append(("ins", " ".join(b[j1:j2])))
    return pieces


def answer_text(trace: Mapping[str, Any]) -> str | None:
    response = trace.get("response") or {}
    answer = response.get("answer")
    return None if answer is None else str(answer)
