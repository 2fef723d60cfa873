"""Choose the context prompt by a small measurement (``python -m services.rewriter.measure``).

For ``n`` SciFact *train* (query, relevant document) pairs (test-judged documents excluded), each
context-prompt variant rewrites the query, and so does the query-only ablation. Each rewrite is
scored by where BM25 (bm25s, the index service's tokenisation: English stop words, Snowball
stemmer) over the 5,183-abstract corpus ranks the relevant document, against the original query,
and by how much of the passage it copies:

- ``overlap``: share of the rewrite's content words (lowercased, stop words removed) found in the
  passage. A rewrite should name the document's topic, so some overlap is the point; a rewrite
  made of passage words is the document leaking into the query.
- ``copied8``: share of rewrites that contain 8 consecutive passage words (copied text).

The rank gain of a context rewrite is partly that leakage: BM25 rewards passage words. The number
to read is the gain *together with* a low ``copied8``. Rewrites go through the engine's cache
(one file per prompt version under ``<data_dir>/rewriter/cache``), so a rerun costs no generation.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

from services.rewriter.engine import (
    PROMPTS,
    RewritePair,
    RewriterConfig,
    RewriterEngine,
    cache_root,
    dataset_pairs,
    sample_documents,
)
from shared.settings import Settings, get_settings
from shared.text import FUNCTION_WORDS

DEFAULT_VARIANTS = ("context-instruct-v2", "context-terms-v1")
_WORD = re.compile(r"[a-z0-9]+")
#: Content words: what is left without these (the orchestrator's function words and more).
_STOP = FUNCTION_WORDS | frozenset(
    [
        "been",
        "these",
        "those",
        "into",
        "than",
        "then",
        "there",
        "their",
        "which",
        "who",
        "whom",
        "what",
        "when",
        "where",
        "why",
        "how",
        "does",
        "do",
        "did",
        "can",
        "could",
        "may",
        "might",
        "not",
        "no",
        "nor",
        "so",
        "such",
        "about",
        "over",
        "under",
        "between",
        "within",
        "without",
    ]
)


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def overlap(rewrite: str, passage: str) -> float:
    """Share of the rewrite's content words that occur in the passage."""
    words = content_words(rewrite)
    if not words:
        return 0.0
    vocabulary = set(content_words(passage))
    return sum(w in vocabulary for w in words) / len(words)


def copies_ngram(rewrite: str, passage: str, n: int = 8) -> bool:
    """The rewrite contains ``n`` consecutive words of the passage."""
    words = _WORD.findall(rewrite.lower())
    passage_words = _WORD.findall(passage.lower())
    grams = {tuple(passage_words[i : i + n]) for i in range(len(passage_words) - n + 1)}
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))


class Bm25:
    """bm25s over ``title text`` of every document, tokenised as the index service does."""

    def __init__(self, documents: Sequence[Any]) -> None:
        import bm25s

        self.ids = [d.id for d in documents]
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize([f"{d.title} {d.text}" for d in documents]))

    @staticmethod
    def _tokenize(texts: Sequence[str]) -> Any:
        import bm25s
        import Stemmer

        return bm25s.tokenize(
            list(texts), stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False
        )

    def search(self, query: str, k: int) -> list[str]:
        """The ids of the top-``k`` documents with a positive score, best first."""
        tokens = self._tokenize([query])
        if not tokens.ids or not tokens.ids[0]:
            return []
        indices, scores = self.retriever.retrieve(
            tokens, k=min(k, len(self.ids)), show_progress=False, n_threads=1
        )
        return [
            self.ids[index]
            for index, score in zip(indices[0].tolist(), scores[0].tolist(), strict=True)
            if score > 0
        ]

    def rank(self, query: str, doc_id: str, depth: int = 1000) -> int | None:
        ranked = self.search(query, depth)
        return ranked.index(doc_id) + 1 if doc_id in ranked else None


def _summarise(ranks: list[int | None], rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    depth = 1001
    filled = [r if r is not None else depth for r in ranks]
    return {
        "mrr@10": round(sum(1 / r for r in filled if r <= 10) / len(filled), 4),
        "recall@10": round(sum(r <= 10 for r in filled) / len(filled), 4),
        "recall@100": round(sum(r <= 100 for r in filled) / len(filled), 4),
        "median_rank": statistics.median(filled),
        "overlap": round(statistics.mean(row[f"{key}_overlap"] for row in rows), 4),
        "copied8": round(sum(row[f"{key}_copied8"] for row in rows) / len(rows), 4),
        "mean_words": round(statistics.mean(len(row[key].split()) for row in rows), 1),
    }


def measure_prompts(
    settings: Settings,
    *,
    n: int = 30,
    seed: int = 0,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    query_only: bool = True,
    max_new_tokens: int = 32,
    context_tokens: int = 192,
) -> dict[str, Any]:
    """Rank and copying figures per prompt variant (and for the original queries)."""
    from shared.datasets import load_scifact

    started = time.perf_counter()
    selected = dataset_pairs("scifact", "train")
    pairs: list[RewritePair] = sample_documents(selected.pairs, n, seed)
    bm25 = Bm25(load_scifact().corpus)
    passages = {p.document.id: f"{p.document.title} {p.document.text}" for p in pairs}
    original_ranks = [bm25.rank(p.query, p.document.id) for p in pairs]
    original_rows = [
        {
            "original": p.query,
            "original_overlap": overlap(p.query, passages[p.document.id]),
            "original_copied8": copies_ngram(p.query, passages[p.document.id]),
        }
        for p in pairs
    ]
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "context_tokens": context_tokens,
        "original": _summarise(original_ranks, original_rows, "original"),
        "variants": {},
    }
    jobs = [(v, "context") for v in variants]
    if query_only:
        jobs.append(("query-only-v1", "query-only"))
    for version, mode in jobs:
        prompts = {"context": "context-instruct-v2", "query-only": "query-only-v1"}
        prompts["synthetic"] = "synthetic-fewshot-v1"
        prompts[mode] = version
        config = RewriterConfig(
            max_new_tokens=max_new_tokens, context_tokens=context_tokens, prompts=prompts
        )
        # get_generator keeps one model per process: every variant shares it.
        engine = RewriterEngine.from_settings(settings, config)
        variant_started = time.perf_counter()
        records = engine.rewrite_batch(pairs, mode)
        rows = []
        ranks = []
        for pair, record in zip(pairs, records, strict=True):
            passage = passages[pair.document.id]
            ranks.append(bm25.rank(record.rewritten_query, pair.document.id))
            rows.append(
                {
                    "qid": pair.qid,
                    "doc_id": pair.document.id,
                    "original": pair.query,
                    "rewrite": record.rewritten_query,
                    "fell_back": record.fell_back,
                    "rank_original": original_ranks[len(ranks) - 1],
                    "rank_rewrite": ranks[-1],
                    "rewrite_overlap": overlap(record.rewritten_query, passage),
                    "rewrite_copied8": copies_ngram(record.rewritten_query, passage),
                }
            )
        summary = _summarise(ranks, rows, "rewrite")
        summary["fell_back"] = sum(r["fell_back"] for r in rows)
        summary["generated"] = engine.llm_calls
        summary["seconds"] = round(time.perf_counter() - variant_started, 1)
        report["variants"][version] = {"mode": mode, **summary, "examples": rows}
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'variant':24} {'MRR@10':>7} {'R@10':>6} {'R@100':>6} {'med':>6} "
        f"{'overlap':>8} {'copied8':>8} {'words':>6} {'fellback':>8}"
    )
    lines = [header]

    def line(name: str, s: dict[str, Any]) -> str:
        return (
            f"{name:24} {s['mrr@10']:7.3f} {s['recall@10']:6.2f} {s['recall@100']:6.2f} "
            f"{s['median_rank']:6.0f} {s['overlap']:8.2f} {s['copied8']:8.2f} "
            f"{s['mean_words']:6.1f} {s.get('fell_back', 0):8d}"
        )

    lines.append(line("original query", report["original"]))
    for name, summary in report["variants"].items():
        lines.append(line(name, summary))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--no-query-only", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--context-tokens", type=int, default=192)
    parser.add_argument("--json", help="also write the full report (with every rewrite) here")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in PROMPTS]
    if unknown:
        parser.error(f"unknown prompt(s): {', '.join(unknown)}")
    settings = get_settings()
    report = measure_prompts(
        settings,
        n=args.n,
        seed=args.seed,
        variants=args.variants,
        query_only=not args.no_query_only,
        max_new_tokens=args.max_new_tokens,
        context_tokens=args.context_tokens,
    )
    print(format_table(report))
    print(f"{report['pairs']} pairs, {report['seconds']} s; cache: {cache_root(settings)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
