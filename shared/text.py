"""English function words, for the places that compare texts by their content words."""

from __future__ import annotations

#: Articles, the commonest prepositions and conjunctions, forms of "be", "it", "this" and "that":
#: what the orchestrator leaves out when it matches an answer or a query against passages, and
#: the core of the rewriter measurement's longer list (``services.rewriter.measure``).
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "is",
        "was",
        "by",
        "for",
        "and",
        "or",
        "with",
        "as",
        "from",
        "it",
        "its",
        "this",
        "that",
        "be",
        "are",
        "were",
    ]
)
