"""What the fmindex's ``/search`` answers, built from an engine outcome: one home for the HTTP
route and the in-process backend (``services.fmindex.inprocess``), so neither imports the other
and no other service imports this service's ``api``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.fmindex.engine import FmEngine, FmSearchOutcome
from services.fmindex.scoring import Match
from shared.schemas import Hit, IndexSearchResponse, SourceRank

RETRIEVER = "fm"


class MatchedNgram(BaseModel):
    ngram: str
    tokens: list[int]
    kind: Literal["body", "title", "unigram"]
    frequency: int
    """Occurrences in the whole corpus (the FM-index count)."""
    logprob: float
    """log P(n | query) under the generator."""
    weight: float
    """SEAL's weight of the n-gram (log-odds, clipped, ** α for n-grams)."""
    contribution: float
    """Weight × coverage coefficient: what it added to this document's score."""


class FmHit(Hit):
    ngrams: list[MatchedNgram] = Field(default_factory=list)


class FmSearchResponse(IndexSearchResponse):
    results: dict[str, list[FmHit]]  # type: ignore[assignment]
    generator: str
    forward_passes: int


def _matched(engine: FmEngine, match: Match) -> MatchedNgram:
    key = match.key
    return MatchedNgram(
        ngram=engine.describe_key(key),
        tokens=list(key.tokens),
        kind=key.kind,  # type: ignore[arg-type]
        frequency=key.count,
        logprob=round(key.logprob, 4),
        weight=round(key.weight, 4),
        contribution=round(match.contribution, 4),
    )


def search_response(engine: FmEngine, outcome: FmSearchOutcome) -> FmSearchResponse:
    hits = [
        FmHit(
            doc_id=hit.doc_id,
            title=hit.title,
            text=hit.text,
            score=round(hit.score, 6),
            sources={RETRIEVER: SourceRank(rank=rank, score=round(hit.score, 6))},
            ngrams=[_matched(engine, m) for m in hit.matches + hit.unigrams],
        )
        for rank, hit in enumerate(outcome.hits, start=1)
    ]
    timings = {k: round(v, 2) for k, v in outcome.timings_ms.items() if k != "forward_passes"}
    return FmSearchResponse(
        collection=outcome.collection,
        version=outcome.version,
        results={RETRIEVER: hits},
        timings_ms=timings,
        generator=outcome.generator,
        forward_passes=int(outcome.timings_ms.get("forward_passes", 0)),
    )
