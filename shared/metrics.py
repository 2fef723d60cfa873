"""Standard evaluation metrics: retrieval (trec_eval semantics), QA (SQuAD EM/F1), significance.

Retrieval metrics come from ``pytrec_eval`` (the trec_eval C code), so numbers are comparable with
BEIR and published tables; nothing here re-implements nDCG or recall.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval
from scipy import stats

# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEvaluation:
    """Per-query and mean metrics of one run.

    ``per_query`` has one entry per query in the qrels (``{qid: {metric: value}}``), including
    ``missing_queries`` (no run entry), which score 0 on every metric. ``mean`` averages over
    ``per_query``. ``ignored_queries`` are run queries without judgements; they are not scored.
    Metric names: ``ndcg@K``, ``recall@K``, ``mrr@K``.
    """

    per_query: dict[str, dict[str, float]]
    mean: dict[str, float]
    num_queries: int
    missing_queries: list[str]
    ignored_queries: list[str]

    def values(self, metric: str) -> list[float]:
        """One metric per query, in sorted query-id order (pairs two runs for significance)."""
        return [self.per_query[qid][metric] for qid in sorted(self.per_query)]


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Doc ids best first, with trec_eval's order: score descending, ties by doc id descending.

    trec_eval ignores the rank column and sorts by (score desc, docno desc, by strcmp); Python's
    string order is code-point order, which matches strcmp on UTF-8 bytes.
    """
    by_id_desc = sorted(scores, reverse=True)
    return sorted(by_id_desc, key=lambda doc_id: -float(scores[doc_id]))  # stable: keeps ties


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    ndcg_cutoffs: Sequence[int] = (10,),
    recall_cutoffs: Sequence[int] = (10, 100),
    mrr_cutoffs: Sequence[int] = (10,),
    relevance_level: int = 1,
) -> RunEvaluation:
    """nDCG@k, Recall@k and MRR@k of ``run`` (``{qid: {doc_id: score}}``) against ``qrels``.

    Semantics are trec_eval's, computed by pytrec_eval:

    * Ranking: by score, higher first; ties broken by doc id, descending (trec_eval's rule; see
      :func:`rank_documents`). Any rank the caller had in mind is ignored: only scores count.
    * nDCG@k (``ndcg_cut.k``): gain = the graded relevance, discount log2(rank + 1), normalised by
      the ideal ordering of all judged documents of the query.
    * Recall@k (``recall.k``): relevant documents (relevance >= ``relevance_level``) in the top k
      over all relevant documents of the query.
    * MRR@k: trec_eval's ``recip_rank`` has no cutoff, so each query's run is first truncated to
      its top k with the ranking above; a first relevant document below rank k scores 0.
    * Queries in the qrels that the run lacks (or has with no documents) score 0 on every metric
      and count in the mean, like ``trec_eval -c``; they are listed in ``missing_queries``.
      Queries in the run with no qrels are ignored (trec_eval's behaviour) and listed in
      ``ignored_queries``. A query whose judgements are all non-relevant stays in the mean with
      whatever trec_eval gives it (0).
    """
    if not qrels:
        raise ValueError("qrels is empty: nothing to evaluate against")
    for name, cutoffs in (("ndcg", ndcg_cutoffs), ("recall", recall_cutoffs), ("mrr", mrr_cutoffs)):
        if any(k < 1 for k in cutoffs):
            raise ValueError(f"{name} cutoffs must be >= 1, got {list(cutoffs)}")
    qrels_plain = {qid: {d: int(rel) for d, rel in docs.items()} for qid, docs in qrels.items()}
    # pytrec_eval needs float scores; queries with no documents are treated as missing.
    run_plain = {
        qid: {d: float(s) for d, s in docs.items()}
        for qid, docs in run.items()
        if qid in qrels_plain and docs
    }
    for qid, docs in run_plain.items():
        bad = [d for d, s in docs.items() if math.isnan(s)]
        if bad:
            raise ValueError(f"run scores must not be NaN (query {qid!r}, docs {bad[:3]})")

    metric_map: dict[str, str] = {}
    for k in ndcg_cutoffs:
        metric_map[f"ndcg_cut_{k}"] = f"ndcg@{k}"
    for k in recall_cutoffs:
        metric_map[f"recall_{k}"] = f"recall@{k}"
    measures: set[str] = set()
    if ndcg_cutoffs:
        measures.add("ndcg_cut." + ",".join(str(k) for k in sorted(set(ndcg_cutoffs))))
    if recall_cutoffs:
        measures.add("recall." + ",".join(str(k) for k in sorted(set(recall_cutoffs))))

    per_query: dict[str, dict[str, float]] = {
        qid: dict.fromkeys([*metric_map.values(), *(f"mrr@{k}" for k in mrr_cutoffs)], 0.0)
        for qid in qrels_plain
    }
    if run_plain and measures:
        evaluator = pytrec_eval.RelevanceEvaluator(
            qrels_plain, measures, relevance_level=relevance_level
        )
        for qid, values in evaluator.evaluate(run_plain).items():
            for trec_name, ours in metric_map.items():
                per_query[qid][ours] = float(values[trec_name])
    for k in mrr_cutoffs:
        truncated = {
            qid: {d: docs[d] for d in rank_documents(docs)[:k]} for qid, docs in run_plain.items()
        }
        if not truncated:
            continue
        evaluator = pytrec_eval.RelevanceEvaluator(
            qrels_plain, {"recip_rank"}, relevance_level=relevance_level
        )
        for qid, values in evaluator.evaluate(truncated).items():
            per_query[qid][f"mrr@{k}"] = float(values["recip_rank"])

    metric_names = list(next(iter(per_query.values())))
    mean = {m: float(np.mean([v[m] for v in per_query.values()])) for m in metric_names}
    return RunEvaluation(
        per_query=per_query,
        mean=mean,
        num_queries=len(per_query),
        missing_queries=sorted(q for q in qrels_plain if q not in run_plain),
        ignored_queries=sorted(q for q in run if q not in qrels_plain),
    )


# --------------------------------------------------------------------------------------------
# QA: SQuAD exact match and token F1
# --------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation, made Unicode-aware.

    The official steps: lowercase, delete punctuation, delete the articles a/an/the, collapse
    whitespace. For ASCII text the result is identical to the official script. Additions: the
    text is first NFKC-normalised (full-width letters, ligatures, no-break spaces become their
    plain forms) and every Unicode punctuation character (category P*: curly quotes, dashes,
    ``¿``, ``«»``, CJK full stops) is deleted like ASCII punctuation. Like SQuAD, punctuation is
    deleted, not replaced by a space, so ``don't`` -> ``dont`` and ``1954–1959`` -> ``19541959``.
    Accents are kept (``Röntgen`` != ``Rontgen``), as in SQuAD.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("golds must be a list of strings, not a single string")
    if not golds:
        raise ValueError("golds is empty: at least one reference answer is needed")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    _check_golds(golds)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in golds))


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        # SQuAD 2.0 convention: two empty answers agree; one empty answer scores 0.
        return float(prediction_tokens == gold_tokens)
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalised tokens), the maximum over the gold answers."""
    _check_golds(golds)
    prediction_tokens = normalize_answer(prediction).split()
    return max(_token_f1(prediction_tokens, normalize_answer(g).split()) for g in golds)


# --------------------------------------------------------------------------------------------
# Significance of paired differences (same queries, two systems)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignificanceResult:
    """``mean_difference`` = mean(a - b); ``p_value`` for H0: no difference, two-sided except
    where the test says otherwise (``paired_randomization`` is one-sided)."""

    mean_difference: float
    p_value: float
    n: int


def _paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(diff)):
        raise ValueError("paired samples must be finite numbers")
    return diff


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> SignificanceResult:
    """Two-sided paired Student t-test (``scipy.stats.ttest_rel``) on per-query scores.

    When every difference is the same the t statistic is undefined (zero variance): the p-value
    is then 1.0 if that difference is 0 (the systems agree everywhere) and 0.0 otherwise.
    """
    diff = _paired_differences(a, b)
    mean = float(diff.mean())
    if np.all(diff == diff[0]):
        return SignificanceResult(
            mean_difference=mean, p_value=1.0 if mean == 0 else 0.0, n=len(diff)
        )
    result = stats.ttest_rel(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return SignificanceResult(mean_difference=mean, p_value=float(result.pvalue), n=len(diff))


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n: int = 10000, seed: int = 0
) -> SignificanceResult:
    """Two-sided paired bootstrap test (Efron & Tibshirani 1993, §16.4; Sakai 2006).

    The per-query differences d are shifted to mean 0 (so that H0 holds), resampled with
    replacement ``n`` times, and the p-value is the share of resampled means at least as far
    from 0 as the observed mean, with the usual +1 correction: ``(count + 1) / (n + 1)``, so a
    finite bootstrap never reports exactly 0. Deterministic for a given ``seed``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    diff = _paired_differences(a, b)
    observed = float(diff.mean())
    centred = diff - observed
    rng = np.random.default_rng(seed)
    count = 0
    chunk = max(1, 2_000_000 // len(diff))  # bound memory: ~16 MB of indices per chunk
    remaining = n
    while remaining > 0:
        size = min(chunk, remaining)
        indices = rng.integers(0, len(diff), size=(size, len(diff)))
        means = centred[indices].mean(axis=1)
        count += int(np.count_nonzero(np.abs(means) >= abs(observed) - 1e-12))
        remaining -= size
    return SignificanceResult(mean_difference=observed, p_value=(count + 1) / (n + 1), n=len(diff))


def paired_randomization(
    a: Sequence[float], b: Sequence[float], n: int = 10000, seed: int = 0
) -> SignificanceResult:
    """One-sided paired randomization (sign-flip) test for H1: mean(a - b) > 0 (Fisher; the
    test Smucker, Allan & Carterette 2007 recommend for IR).

    Under H0 each per-query difference is as likely to have either sign; the p-value is the
    share of sign assignments whose mean is at least the observed one. Exact (all 2^m
    assignments of the m non-zero differences) for m <= 16, else ``n`` seeded random ones with
    the +1 correction. Unlike the bootstrap it cannot call a handful of queries significant:
    with m queries the smallest p is 2^-m.
    """
    diff = _paired_differences(a, b)
    observed = float(diff.mean())
    nonzero = diff[diff != 0]
    if len(nonzero) == 0:
        return SignificanceResult(mean_difference=observed, p_value=1.0, n=len(diff))
    total = float(nonzero.sum())
    if len(nonzero) <= 16:
        bits = (np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1
        sums = ((1 - 2 * bits) * nonzero).sum(axis=1)
        p = float(np.count_nonzero(sums >= total - 1e-12)) / len(sums)
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((-1.0, 1.0), size=(n, len(nonzero)))
        count = int(np.count_nonzero((signs * nonzero).sum(axis=1) >= total - 1e-12))
        p = (count + 1) / (n + 1)
    return SignificanceResult(mean_difference=observed, p_value=p, n=len(diff))
