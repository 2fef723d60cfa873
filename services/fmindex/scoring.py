"""SEAL's document scoring (``keys.aggregate_evidence`` + the intersective searcher), exactly.

For an n-gram ``n`` with ``s = log P(n | q)`` (the generator's log-probability), corpus count
``F(n)`` and ``T`` tokens in the corpus::

    log P(n) = log((F(n) + σ) / (T + σ))                       σ = smoothing = 5
    w(n)     = max(0, (s + log(1 − P(n))) − (log P(n) + log(1 − e^s)))   (log-odds ratio)
    w(n)    ← w(n) ** α                                         α = score_exponent = 2

Unigrams get the same log-odds weight without the exponent. N-grams with ``F > skip_frequent``
are dropped; those with ``F ≤ max_hits`` are *rare*: they generate candidates (each occurrence
is located and its document collects the n-gram once). Frequent ones only score.

Per document, n-grams count in decreasing weight, each multiplied by the coverage coefficient
``1 − β + β · |tokens(n) \\ covered| / |tokens(n)|`` (β = repetition_penalty = 0.8), where
``covered`` is the set of token ids of the n-grams the document has already been credited with.
The top ``fully_score`` candidates are then scored in full: every occurrence of every weighted
n-gram in the document's text is found, non-overlapping matches are taken greedily in decreasing
weight (a repeated n-gram never adds twice), and the unigram weights of tokens still free are
added back with the same coefficient. The score is that sum; each hit lists its matched
n-grams with their corpus frequency and the weight they contributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.fmindex.fm import FMIndex

#: The highest log-probability used in the log-odds (``log(1 − e^s)`` is −∞ at ``s = 0``).
MAX_LOGPROB = math.log1p(-1e-6)


@dataclass(frozen=True)
class ScoringConfig:
    smoothing: float = 5.0
    score_exponent: float = 2.0
    repetition_penalty: float = 0.8
    max_hits: int = 1500
    fully_score: int = 1500
    skip_frequent: int = 10_000_000
    use_top_k_ngrams: int = 5000
    unigram_scores: bool = True
    best_unigrams: int = 15
    """How many of the best-weighted unigrams join the n-gram keys
    (``add_best_unigrams_to_ngrams``); 0 turns it off."""
    single_key: bool = False
    """Ablation: a document's score is its best single n-gram."""


def log_odds_weight(logprob: float, count: int, total: int, smoothing: float) -> float:
    """SEAL's n-gram weight before the exponent: log-odds of the n-gram given the query against
    its smoothed corpus prior, clipped at 0."""
    s = min(logprob, MAX_LOGPROB)
    prior = math.log((count + smoothing) / (total + smoothing))
    value = (s + math.log1p(-math.exp(prior))) - (prior + math.log1p(-math.exp(s)))
    return max(0.0, value)


def ngram_weight(logprob: float, count: int, total: int, config: ScoringConfig) -> float:
    return float(log_odds_weight(logprob, count, total, config.smoothing) ** config.score_exponent)


def coverage_coefficient(tokens: Sequence[int], covered: set[int], beta: float) -> float:
    if not tokens:
        return 0.0
    fresh = sum(1 for t in tokens if t not in covered)
    return 1.0 - beta + beta * fresh / len(tokens)


@dataclass(frozen=True)
class Key:
    tokens: tuple[int, ...]
    logprob: float
    count: int
    weight: float
    kind: str
    """``body``, ``title`` or ``unigram``."""


@dataclass
class Match:
    key: Key
    contribution: float
    """``key.weight × coverage coefficient`` as credited to the document."""


@dataclass
class ScoredDocument:
    doc: int
    score: float
    matches: list[Match] = field(default_factory=list)
    unigrams: list[Match] = field(default_factory=list)


def build_keys(
    ngrams: Sequence[tuple[tuple[int, ...], float, str]],
    fm: FMIndex,
    config: ScoringConfig,
    unigram_logprobs: np.ndarray | None = None,
    banned: frozenset[int] = frozenset(),
) -> tuple[list[Key], dict[int, Key]]:
    """Weighted keys from ``(tokens, logprob, kind)`` n-grams, and the unigram weights.

    Duplicate n-grams keep their best log-prob. Unigram weights come from the decoder's first
    step distribution (SEAL's ``unigram_scores``) for every token that occurs in the corpus.
    """
    total = fm.n - 1
    best: dict[tuple[int, ...], tuple[float, str]] = {}
    for tokens, logprob, kind in ngrams:
        if tokens and (tokens not in best or logprob > best[tokens][0]):
            best[tokens] = (logprob, kind)
    unigram_keys: dict[int, Key] = {}
    if config.unigram_scores and unigram_logprobs is not None:
        for token, count in zip(
            fm.occurring_tokens.tolist(), fm.occurring_counts.tolist(), strict=True
        ):
            if token in banned or token >= unigram_logprobs.shape[0]:
                continue
            weight = log_odds_weight(float(unigram_logprobs[token]), count, total, config.smoothing)
            if weight > 0:
                unigram_keys[token] = Key(
                    (token,), float(unigram_logprobs[token]), count, weight, "unigram"
                )
        if config.best_unigrams:
            for key in sorted(unigram_keys.values(), key=lambda k: -k.weight)[
                : config.best_unigrams
            ]:
                if key.tokens not in best or key.logprob > best[key.tokens][0]:
                    best[key.tokens] = (key.logprob, "unigram")
    keys: list[Key] = []
    for tokens, (logprob, kind) in best.items():
        count = fm.count(tokens)
        if count == 0 or count > config.skip_frequent:
            continue
        weight = ngram_weight(logprob, count, total, config)
        if weight > 0:
            keys.append(Key(tokens, logprob, count, weight, kind))
    keys.sort(key=lambda k: (-k.weight, k.tokens))
    return keys[: config.use_top_k_ngrams], unigram_keys


def _credit(keys: Sequence[Key], beta: float) -> tuple[float, list[Match], set[int]]:
    """Sum of weights × coverage coefficients, keys taken in decreasing weight."""
    covered: set[int] = set()
    total = 0.0
    matches: list[Match] = []
    for key in sorted(keys, key=lambda k: (-k.weight, k.tokens)):
        contribution = key.weight * coverage_coefficient(key.tokens, covered, beta)
        covered.update(key.tokens)
        total += contribution
        matches.append(Match(key, contribution))
    return total, matches, covered


def candidate_scores(
    keys: Sequence[Key],
    fm: FMIndex,
    doc_of: Callable[[np.ndarray], np.ndarray],
    config: ScoringConfig,
) -> dict[int, list[Key]]:
    """Rare keys locate their occurrences; each document collects each key once."""
    found: dict[int, list[Key]] = {}
    for key in keys:
        if key.count > config.max_hits:
            continue
        lo, hi = fm.range(key.tokens)
        positions = fm.positions(fm.locate_rows(lo, hi, config.max_hits), len(key.tokens))
        for doc in np.unique(doc_of(positions)).tolist():
            if doc >= 0:
                found.setdefault(int(doc), []).append(key)
    return found


class KeyMatcher:
    """Finds every occurrence of every key in a document's tokens (a trie walked from the
    positions whose token starts some key)."""

    def __init__(self, keys: Sequence[Key]) -> None:
        self.trie: dict[int, Any] = {}
        self._end = -1
        for index, key in enumerate(keys):
            node: dict[int, Any] = self.trie
            for token in key.tokens:
                node = node.setdefault(token, {})
            node[self._end] = index
        self.first_tokens = np.fromiter(self.trie.keys(), dtype=np.int64)

    def matches(self, tokens: np.ndarray) -> list[tuple[int, int, int]]:
        """``(key index, start, end)`` for every occurrence."""
        out: list[tuple[int, int, int]] = []
        sequence = tokens.tolist()
        starts = np.nonzero(np.isin(tokens, self.first_tokens))[0].tolist()
        n = len(sequence)
        for start in starts:
            node: dict[int, Any] = self.trie
            pos = start
            while pos < n:
                child = node.get(sequence[pos])
                if child is None:
                    break
                node = child
                pos += 1
                if self._end in node:
                    out.append((int(node[self._end]), start, pos))
        return out


def full_score(
    doc: int,
    tokens: np.ndarray,
    keys: Sequence[Key],
    matcher: KeyMatcher,
    unigram_keys: dict[int, Key],
    config: ScoringConfig,
) -> ScoredDocument:
    """Greedy non-overlapping matches in decreasing weight, coverage penalty, unigram add-back."""
    beta = config.repetition_penalty
    occurrences: dict[int, list[tuple[int, int]]] = {}
    for index, start, end in matcher.matches(tokens):
        occurrences.setdefault(index, []).append((start, end))
    used = np.zeros(tokens.shape[0], dtype=bool)
    covered: set[int] = set()
    score = 0.0
    matches: list[Match] = []
    # keys are sorted by decreasing weight; their list index is the trie's payload.
    for index in sorted(occurrences, key=lambda i: (-keys[i].weight, keys[i].tokens)):
        key = keys[index]
        for start, end in occurrences[index]:
            if not used[start:end].any():
                contribution = key.weight * coverage_coefficient(key.tokens, covered, beta)
                if config.single_key:
                    contribution = key.weight
                used[start:end] = True
                covered.update(key.tokens)
                score = max(score, contribution) if config.single_key else score + contribution
                matches.append(Match(key, contribution))
                break  # the same n-gram never counts twice in one document
    unigrams: list[Match] = []
    if unigram_keys and not config.single_key:
        free = {int(t) for t in np.unique(tokens[~used]).tolist()}
        for token in sorted(
            free, key=lambda t: -unigram_keys[t].weight if t in unigram_keys else 0.0
        ):
            unigram = unigram_keys.get(token)
            if unigram is None:
                continue
            contribution = unigram.weight * coverage_coefficient(unigram.tokens, covered, beta)
            covered.add(token)
            score += contribution
            unigrams.append(Match(unigram, contribution))
    return ScoredDocument(doc, score, matches, unigrams)


def score_documents(
    keys: Sequence[Key],
    unigram_keys: dict[int, Key],
    fm: FMIndex,
    doc_of: Callable[[np.ndarray], np.ndarray],
    doc_tokens: Callable[[int], np.ndarray],
    config: ScoringConfig,
    k: int,
) -> list[ScoredDocument]:
    """SEAL's intersective retrieval: candidates from rare keys, full scoring of the best."""
    found = candidate_scores(keys, fm, doc_of, config)
    initial = {
        doc: _credit(doc_keys, config.repetition_penalty)[0] for doc, doc_keys in found.items()
    }
    shortlist = sorted(initial, key=lambda d: (-initial[d], d))[: config.fully_score]
    matcher = KeyMatcher(keys)
    scored = [
        full_score(doc, doc_tokens(doc), keys, matcher, unigram_keys, config) for doc in shortlist
    ]
    scored.sort(key=lambda d: (-d.score, d.doc))
    return scored[:k]
