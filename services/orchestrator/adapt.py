"""Online adaptation from feedback (NExT-Search): pins, removals and relevance feedback.

Plain Python (numpy, no FastAPI), so the API, a rerun and the evaluation
(``lodestar experiment feedback``, which sweeps the weights) run the same code:

- ``pin`` puts a document first (pins in the order they were given), ``remove`` takes it out;
- ``relevant`` / ``irrelevant`` adapt the query: **Rocchio** moves the dense query vector,
  ``q' = α q + β mean(relevant) − γ mean(irrelevant)``, renormalised (MiniLM vectors are unit
  length and scored by inner product); **RM3** adds expansion terms from the relevant documents
  to the BM25 query, interpolated with the original query's terms;
- every judged document is reported with its label (``pinned`` wins over a relevance label).

Where the Rocchio arithmetic runs (design note): here, in the orchestrator, not in the index.
The index service only gives vectors (``POST /embed``: the query as ``/search`` embeds it, a hit's
title and text as indexing embeds them, so a judged hit gets back its stored passage vector) and
searches with a given ``query_vector`` / weighted ``bm25_terms``. That keeps the feedback policy
(weights, which labels count, conflict rules) in one module the experiment imports, while the
index stays a generic vector/term searcher. The passage vector used for a judged document is the
passage the user was shown (the hit's text), which is what the judgment is about.

Defaults are the textbook settings (Rocchio α=1, β=0.75, γ=0.15 as in SMART; RM3 with 10
expansion terms and original-query weight 0.5 as in Anserini), not tuned here: the feedback
experiment measures and may replace them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from shared.schemas import Hit

Judgement = Literal["relevant", "irrelevant", "pinned"]

#: Feedback actions on documents that adaptation reads (others are ignored here).
DOC_ACTIONS = frozenset({"pin", "remove", "relevant", "irrelevant"})

#: English function words left out of RM3's relevance model (a term like "the" would otherwise
#: top every expansion). Written for this module; BM25's own tokenizer drops its stop words too.
STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "one",
        "two",
        "may",
        "might",
        "must",
        "shall",
        "its",
        "also",
        "known",
        "became",
        "become",
        "many",
        "much",
        "first",
        "new",
        "used",
        "use",
        "including",
        "however",
        "since",
        "within",
        "without",
        "upon",
        "via",
        "among",
        "who",
        "whose",
    ]
)
_TOKEN_RE = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    """Lowercased word tokens without stop words, one-character tokens or bare numbers."""
    return [
        token
        for token in _TOKEN_RE.findall(text.lower())
        if len(token) > 1 and not token.isdigit() and token not in STOP_WORDS
    ]


@dataclass(frozen=True)
class AdaptationWeights:
    """The knobs of query adaptation (the feedback experiment sweeps them)."""

    alpha: float = 1.0
    """Rocchio: weight of the original query vector."""
    beta: float = 0.75
    """Rocchio: weight of the relevant documents' mean vector."""
    gamma: float = 0.15
    """Rocchio: weight of the irrelevant documents' mean vector (subtracted)."""
    rm3_terms: int = 10
    """RM3: expansion terms kept from the relevance model."""
    rm3_original_weight: float = 0.5
    """RM3: λ in λ·P(w|q) + (1−λ)·P(w|R); 1 keeps the original query only."""

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("Rocchio weights must be >= 0")
        if self.rm3_terms < 0:
            raise ValueError("rm3_terms must be >= 0")
        if not 0.0 <= self.rm3_original_weight <= 1.0:
            raise ValueError("rm3_original_weight must be in [0, 1]")


def rocchio(
    query: Sequence[float] | np.ndarray,
    relevant: Sequence[Sequence[float]] | np.ndarray,
    irrelevant: Sequence[Sequence[float]] | np.ndarray = (),
    *,
    alpha: float = 1.0,
    beta: float = 0.75,
    gamma: float = 0.15,
) -> np.ndarray:
    """``α q + β mean(relevant) − γ mean(irrelevant)``, renormalised to unit length (an empty
    group contributes nothing). A result of (near) zero length falls back to ``q`` normalised."""
    q = np.asarray(query, dtype=np.float64)
    moved = alpha * q
    rel = np.asarray(relevant, dtype=np.float64)
    nonrel = np.asarray(irrelevant, dtype=np.float64)
    if rel.size:
        moved = moved + beta * rel.reshape(-1, q.shape[0]).mean(axis=0)
    if nonrel.size:
        moved = moved - gamma * nonrel.reshape(-1, q.shape[0]).mean(axis=0)
    norm = float(np.linalg.norm(moved))
    if norm < 1e-12:
        moved, norm = q, float(np.linalg.norm(q)) or 1.0
    out: np.ndarray = (moved / norm).astype(np.float32)
    return out


def relevance_model(
    documents: Sequence[str], doc_weights: Sequence[float] | None = None
) -> dict[str, float]:
    """RM1: P(w|R) = Σ_d P(d) · P(w|d), P(w|d) = tf(w, d) / |d| (maximum likelihood), P(d)
    uniform over explicitly judged documents or proportional to ``doc_weights`` (e.g. retrieval
    scores, for pseudo-relevance feedback). Sums to 1 (empty when no document has a term)."""
    if doc_weights is not None and len(doc_weights) != len(documents):
        raise ValueError("doc_weights must have one weight per document")
    weights = list(doc_weights) if doc_weights is not None else [1.0] * len(documents)
    model: dict[str, float] = {}
    total_weight = 0.0
    for text, weight in zip(documents, weights, strict=True):
        tokens = terms(text)
        if not tokens or weight <= 0:
            continue
        total_weight += weight
        for term, count in Counter(tokens).items():
            model[term] = model.get(term, 0.0) + weight * count / len(tokens)
    if total_weight <= 0:
        return {}
    return {term: value / total_weight for term, value in model.items()}


def rm3_terms(
    query: str,
    relevant_texts: Sequence[str],
    *,
    n_terms: int = 10,
    original_weight: float = 0.5,
    doc_weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """RM3: the top ``n_terms`` of the relevance model (renormalised), interpolated with the
    original query, ``λ·P(w|q) + (1−λ)·P(w|R)``; term -> weight, highest first (ties by term).
    A weighted BM25 query (``IndexSearchRequest.bm25_terms``) scores Σ_w weight(w)·BM25(w, d)."""
    query_terms = terms(query)
    query_model = {t: c / len(query_terms) for t, c in Counter(query_terms).items()}
    expansion = relevance_model(relevant_texts, doc_weights)
    top = sorted(expansion.items(), key=lambda item: (-item[1], item[0]))[: max(n_terms, 0)]
    mass = sum(v for _, v in top)
    feedback = {t: v / mass for t, v in top} if mass > 0 else {}
    if not feedback:
        original_weight = 1.0
    if not query_model:
        original_weight = 0.0
    combined: dict[str, float] = {}
    for term, value in query_model.items():
        combined[term] = combined.get(term, 0.0) + original_weight * value
    for term, value in feedback.items():
        combined[term] = combined.get(term, 0.0) + (1.0 - original_weight) * value
    return dict(sorted(((t, v) for t, v in combined.items() if v > 0), key=lambda i: (-i[1], i[0])))


def hit_text(hit: Hit) -> str:
    return f"{hit.title} {hit.text}".strip()


@dataclass
class FeedbackAdaptation:
    """What feedback asks of a ranking: ``pins`` (first, in this order), ``removes`` (out),
    ``relevant`` / ``irrelevant`` (adapt the query, marked in the response).

    ``documents`` holds the judged documents' title and text (from the traces they were judged
    on): RM3 reads the relevant ones' text, Rocchio embeds the judged passages, and a pinned
    document the new ranking did not retrieve is still shown."""

    pins: list[str] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    relevant: list[str] = field(default_factory=list)
    irrelevant: list[str] = field(default_factory=list)
    documents: dict[str, Hit] = field(default_factory=dict)
    weights: AdaptationWeights = field(default_factory=AdaptationWeights)
    feedback_ids: list[str] = field(default_factory=list)
    """The stored feedback this adaptation came from (provenance for the trace)."""

    def __post_init__(self) -> None:
        for name in ("pins", "removes", "relevant", "irrelevant"):
            setattr(self, name, list(dict.fromkeys(getattr(self, name))))
        if set(self.pins) & set(self.removes):
            raise ValueError("a document cannot be both pinned and removed")
        if set(self.relevant) & set(self.irrelevant):
            raise ValueError("a document cannot be both relevant and irrelevant")

    @classmethod
    def from_feedback(
        cls,
        feedback: Iterable[Mapping[str, Any]],
        *,
        pins: Sequence[str] = (),
        removes: Sequence[str] = (),
        relevant: Sequence[str] = (),
        irrelevant: Sequence[str] = (),
        documents: Mapping[str, Hit] | None = None,
        weights: AdaptationWeights | None = None,
    ) -> FeedbackAdaptation:
        """Stored feedback rows (``target_type``, ``target_id``, ``action``, oldest first), then
        explicit overrides on top. Per document, pin/remove is one choice and relevant/irrelevant
        another: the latest word on each wins (an override beats stored feedback)."""
        placement: dict[str, str] = {}  # doc -> "pin" | "remove", insertion order = pin order
        label: dict[str, str] = {}
        ids: list[str] = []

        def place(doc_id: str, action: str) -> None:
            placement.pop(doc_id, None)
            placement[doc_id] = action

        def judge(doc_id: str, action: str) -> None:
            label.pop(doc_id, None)
            label[doc_id] = action

        for row in feedback:
            action = str(row.get("action"))
            if row.get("target_type") != "doc" or action not in DOC_ACTIONS:
                continue
            doc_id = str(row["target_id"])
            (place if action in ("pin", "remove") else judge)(doc_id, action)
            if row.get("feedback_id"):
                ids.append(str(row["feedback_id"]))
        for doc_id in pins:
            place(doc_id, "pin")
        for doc_id in removes:
            place(doc_id, "remove")
        for doc_id in relevant:
            judge(doc_id, "relevant")
        for doc_id in irrelevant:
            judge(doc_id, "irrelevant")
        return cls(
            pins=[d for d, a in placement.items() if a == "pin"],
            removes=[d for d, a in placement.items() if a == "remove"],
            relevant=[d for d, a in label.items() if a == "relevant"],
            irrelevant=[d for d, a in label.items() if a == "irrelevant"],
            documents=dict(documents or {}),
            weights=weights or AdaptationWeights(),
            feedback_ids=ids,
        )

    @property
    def empty(self) -> bool:
        return not (self.pins or self.removes or self.relevant or self.irrelevant)

    @property
    def adapts_query(self) -> bool:
        """Whether relevance labels with known text can move the query."""
        return any(d in self.documents for d in (*self.relevant, *self.irrelevant))

    def judged(self) -> dict[str, Judgement]:
        """doc id -> how feedback judged it; a pin is reported over a relevance label."""
        marks: dict[str, Judgement] = {d: "relevant" for d in self.relevant}
        marks.update({d: "irrelevant" for d in self.irrelevant})
        marks.update({d: "pinned" for d in self.pins})
        return marks

    def bm25_terms(self, query: str) -> dict[str, float] | None:
        """RM3 expansion of ``query`` from the relevant documents' text; ``None`` without any."""
        texts = [hit_text(self.documents[d]) for d in self.relevant if d in self.documents]
        if not texts:
            return None
        weighted = rm3_terms(
            query,
            texts,
            n_terms=self.weights.rm3_terms,
            original_weight=self.weights.rm3_original_weight,
        )
        return weighted or None

    def query_vector(
        self,
        query: Sequence[float] | np.ndarray,
        relevant: Sequence[Sequence[float]] | np.ndarray,
        irrelevant: Sequence[Sequence[float]] | np.ndarray,
    ) -> np.ndarray:
        """Rocchio with this adaptation's weights."""
        w = self.weights
        return rocchio(query, relevant, irrelevant, alpha=w.alpha, beta=w.beta, gamma=w.gamma)

    def candidates(self, hits: Sequence[Hit]) -> list[Hit]:
        """``hits`` without removed and pinned documents (pins are placed by ``apply``), so a
        reranker spends no slot on them."""
        drop = set(self.removes) | set(self.pins)
        return [h for h in hits if h.doc_id not in drop]

    def apply(self, hits: Sequence[Hit], k: int | None = None) -> list[Hit]:
        """Pinned documents first in pin order (taken from ``hits`` or ``documents``; a pin with
        neither is skipped), then ``hits`` without pinned or removed ones; the first ``k``."""
        by_id = {h.doc_id: h for h in hits}
        pinned = [
            by_id.get(d) or self.documents[d]
            for d in self.pins
            if d in by_id or d in self.documents
        ]
        ranked = pinned + self.candidates(hits)
        return ranked if k is None else ranked[:k]

    def describe(self) -> dict[str, Any]:
        """The adaptation as a trace records it."""
        return {
            "pins": self.pins,
            "removes": self.removes,
            "relevant": self.relevant,
            "irrelevant": self.irrelevant,
            "feedback_ids": self.feedback_ids,
        }
