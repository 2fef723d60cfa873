"""``lodestar experiment car``: CAR — train the cross-encoder on context-aware rewrites.

Protocol (Anand et al. 2023, "Context Aware Query Rewriting for Text Rankers using LLM"), on
SciFact:

1. Training pairs: SciFact *train* claims, each with one relevant abstract; a pair whose abstract
   is judged for any *test* claim is dropped (the leakage guard refuses it anyway), and hard
   negatives come from Lodestar's own hybrid retriever (RRF of dense + BM25) on the original
   query, minus every judged document of the query and every test-judged document.
2. Rewrites with SmolLM2 (``services.rewriter``, cached on disk): ``context`` (the query and its
   relevant abstract: CAR) and ``query-only`` (the paper's concept-drift ablation).
3. Which queries to rewrite: all of them, or only the *ambiguous* ones by a stated rule — low
   retrieval margin, the gap between the dense cosines of the original query's first two
   documents below the training set's median (a query-performance predictor: a flat top means
   the query does not single out its document).
4. One cross-encoder per condition at **equal training steps** and the same seed: ``original``,
   ``car``, ``query-only``, ``original+car``, ``car-ambiguous``; and with InPars / doc2query
   training queries (``--synthetic N``: SmolLM2 writes a query for N sampled SciFact documents
   no test claim is judged on, kept if the hybrid first stage finds the document in its top
   ``--synthetic-filter``), ``original+synthetic`` (as written) and ``car+synthetic`` (each
   synthetic query CAR-rewritten with its document too).
5. Evaluation on the **original** test claims only (no LLM on the query path): the cross-encoder
   re-ranks the RRF top 50 (the rest of the top 100 follows in RRF order) and, the published
   anchors' protocol, the BM25 top 100; plus CAR's follow-up fusion of the specialised ranker
   with the base one (RRF of the re-ranked top 50 and the first stage). nDCG@10, R@100, paired
   t-tests and bootstrap against the first stage and the original-trained model.
6. A second set, cross-domain: HotpotQA dev questions over their pooled paragraphs, BM25 top 100
   re-ranked (the models are trained on SciFact only).

Writes ``<out>/car.json``, ``<out>/car.md`` and ``<out>/car.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.reranker.training_data import CONDITIONS, TrainPair
from services.worker.cross_encoder_job import SYNTHETIC_FILTER_DEPTH
from shared.settings import Settings

DEFAULT_OUT = Path("benchmarks/results/car")
COLLECTION = "eval-scifact"
RERANK_DEPTH = 50
DEPTH = 100
FUSION_K = 60


@dataclass
class CarConfig:
    train_queries: int = 250
    steps: int = 200
    batch_size: int = 8
    negatives: int = 3
    loss: str = "pointwise"
    learning_rate: float = 3e-5
    max_length: int = 160
    conditions: tuple[str, ...] = CONDITIONS
    test_limit: int | None = None
    second_limit: int = 100
    seed: int = 0
    publish: str | None = "best"
    synthetic: int = 0
    """InPars queries to write for sampled corpus documents (the ``+synthetic`` conditions)."""
    synthetic_filter: int = SYNTHETIC_FILTER_DEPTH
    """Keep a synthetic query only if the hybrid first stage ranks its document this high."""


def rank_run(ranking: Sequence[str]) -> dict[str, float]:
    """A ranking as a trec run: scores by rank, so trec_eval evaluates exactly this order."""
    return {doc_id: float(len(ranking) - i) for i, doc_id in enumerate(ranking)}


def rerank_top(ranking: Sequence[str], scores: Mapping[str, float], depth: int) -> list[str]:
    """The top ``depth`` by cross-encoder score (ties keep first-stage order), then the rest."""
    head = sorted(ranking[:depth], key=lambda d: -scores[d])
    return head + list(ranking[depth:])


def fuse(first: Sequence[str], reranked: Sequence[str], k: int = FUSION_K) -> list[str]:
    """RRF of the first stage and the re-ranked list (CAR's follow-up: base + specialised)."""
    score: dict[str, float] = {}
    for ranking in (first, reranked):
        for rank, doc_id in enumerate(ranking, start=1):
            score[doc_id] = score.get(doc_id, 0.0) + 1.0 / (k + rank)
    return sorted(score, key=lambda d: (-score[d], reranked.index(d)))


# --- the experiment -----------------------------------------------------------------------------


def run_car(settings: Settings, config: CarConfig, out_dir: Path) -> dict[str, Any]:
    from lodestar.evaluation.common import (
        ensure_collection,
        progress_bar,
        provenance,
        write_json,
    )
    from lodestar.evaluation.retrieval import InProcessBackend
    from services.reranker.cross_encoder import (
        CrossEncoderTrainConfig,
        TextDoc,
        loss_summary,
        publish_cross_encoder,
        train_cross_encoder,
    )
    from services.reranker.training_data import examples_for, low_margin, rewrite_modes
    from services.worker.cross_encoder_job import scifact_training_pairs
    from shared.datasets import load_scifact
    from shared.metrics import evaluate_run

    started = time.perf_counter()
    dataset = load_scifact()
    corpus = {doc.id: doc for doc in dataset.corpus}
    test_qrels = dict(dataset.qrels["test"])
    if config.test_limit:
        test_qrels = dict(sorted(test_qrels.items())[: config.test_limit])
    forbidden_docs = {d for docs in dataset.qrels["test"].values() for d in docs}
    forbidden_qids = set(dataset.qrels["test"])

    backend = InProcessBackend(settings)
    ensure_collection(backend.engine, COLLECTION, lambda: dataset.corpus, rebuild=False)

    def search(query: str, k: int, retrievers: tuple[str, ...]) -> tuple[list[str], list[float]]:
        result = asyncio.run(
            backend.search(query=query, collection=COLLECTION, k=k, retrievers=retrievers)
        )
        return result.doc_ids, result.scores

    # 1–2. training pairs (+ InPars queries), hard negatives and margins from the hybrid
    # retriever, rewrites (cached: a rerun costs no generation)
    prepared = scifact_training_pairs(
        settings,
        dataset,
        search,
        conditions=config.conditions,
        train_queries=config.train_queries,
        seed=config.seed,
        synthetic=config.synthetic,
        synthetic_filter=config.synthetic_filter,
        # A bar per stage; the stage text names it ("car: rewrite", "car: synthetic").
        progress_for=lambda stage: _one_bar(progress_bar("car", unit="query")),
    )
    pairs = prepared.pairs
    real_pairs = [p for p in pairs if not p.synthetic]
    ambiguous = low_margin(pairs)
    modes = rewrite_modes(config.conditions)
    rewrite_stats = rewrite_effects(real_pairs, corpus, search, modes)
    synthetic_stats = synthetic_effects(
        pairs, prepared.synthetic_requested, config.synthetic_filter
    )

    # 3. first-stage candidates of the original test claims
    first: dict[str, dict[str, list[str]]] = {"rrf": {}, "bm25": {}}
    bar = progress_bar("car: first stage (test)", unit="query")
    for done, qid in enumerate(sorted(test_qrels), start=1):
        query = dataset.queries[qid]
        first["rrf"][qid], _ = search(query, DEPTH, ("dense", "bm25"))
        first["bm25"][qid], _ = search(query, DEPTH, ("bm25",))
        bar(done, len(test_qrels), "search")
    second = second_set(config.second_limit)

    def text_doc(doc_id: str) -> TextDoc:
        doc = corpus[doc_id]
        return TextDoc(doc_id, doc.title, doc.text)

    runs: dict[str, dict[str, dict[str, float]]] = {
        "rrf": {q: rank_run(r) for q, r in first["rrf"].items()},
        "bm25": {q: rank_run(r) for q, r in first["bm25"].items()},
    }
    second_runs: dict[str, dict[str, dict[str, float]]] = {
        "bm25": {q: rank_run(r) for q, r in second["bm25"].items()}
    }
    train_config = CrossEncoderTrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        negatives_per_query=config.negatives,
        loss=config.loss,  # type: ignore[arg-type]
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        seed=config.seed,
    )
    trainings: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    for condition in config.conditions:
        examples = examples_for(
            condition,
            pairs,
            text_doc,
            forbidden_qids=forbidden_qids,
            forbidden_docs=forbidden_docs,
        )
        t0 = time.perf_counter()
        trained = train_cross_encoder(
            examples, train_config, progress=progress_bar(f"car: train {condition}", unit="step")
        )
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = score_candidates(trained, dataset.queries, first, text_doc, condition)
        second_scores = score_candidates(
            trained, second["queries"], {"bm25": second["bm25"]}, second["doc"], condition
        )
        trainings[condition] = {
            "examples": len(examples),
            "sources": {
                s: sum(e.source == s for e in examples) for s in {e.source for e in examples}
            },
            "train_seconds": round(train_seconds, 1),
            "score_seconds": round(time.perf_counter() - t0, 1),
            "loss": loss_summary(trained.losses),
        }
        for qid in test_qrels:
            by_ce = scores[qid]
            rrf_top = rerank_top(first["rrf"][qid], by_ce, RERANK_DEPTH)
            runs.setdefault(f"rrf50+ce:{condition}", {})[qid] = rank_run(rrf_top)
            runs.setdefault(f"bm25-100+ce:{condition}", {})[qid] = rank_run(
                rerank_top(first["bm25"][qid], by_ce, DEPTH)
            )
            runs.setdefault(f"rrf50+ce:{condition}+fusion", {})[qid] = rank_run(
                fuse(first["rrf"][qid], rrf_top)[:DEPTH]
            )
        for qid, ranking in second["bm25"].items():
            second_runs.setdefault(f"bm25-100+ce:{condition}", {})[qid] = rank_run(
                rerank_top(ranking, second_scores[qid], DEPTH)
            )
        models[condition] = trained

    evaluations = {name: evaluate_run(run, test_qrels) for name, run in runs.items()}
    second_evaluations = {
        name: evaluate_run(run, second["qrels"]) for name, run in second_runs.items()
    }
    tests = comparisons(
        {name: ev.per_query for name, ev in evaluations.items()}, config.conditions
    ) + comparisons(
        {name: ev.per_query for name, ev in second_evaluations.items()},
        config.conditions,
        dataset_name="hotpotqa-dev",
    )
    result: dict[str, Any] = {
        "experiment": "car",
        "config": asdict(config),
        "provenance": provenance(),
        "data": {
            "train_pairs": len(real_pairs),
            # Named so a later offline update can keep its feedback queries disjoint from these.
            "train_qids": sorted({p.qid for p in real_pairs}),
            "train_queries_only_test_judged": prepared.dropped,
            "synthetic": synthetic_stats,
            "ambiguous_rule": "dense top-1 minus top-2 cosine below the training median",
            "ambiguous": len(ambiguous),
            "test_queries": len(test_qrels),
            "second_set": {"name": "hotpotqa-dev", "questions": len(second["qrels"])},
            "forbidden_documents": len(forbidden_docs),
        },
        "training": trainings,
        "rewrites": rewrite_stats,
        "scifact": {name: _mean(ev.mean) for name, ev in evaluations.items()},
        "hotpotqa": {name: _mean(ev.mean) for name, ev in second_evaluations.items()},
        "significance": tests,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if config.publish:
        result["published"] = publish_best(settings, config, result, models, publish_cross_encoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "car.json", result)
    (out_dir / "car.md").write_text(report_markdown(result))
    plot(result, out_dir / "car.png")
    return result


def _one_bar(bar: Callable[[int, int, str], None]) -> Callable[[int, int, str], None]:
    """The rewriter's stage text carries a running count ("rewrite (3 generated)"): one bar."""
    return lambda done, total, stage: bar(done, total, stage.split(" (")[0])


def _mean(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items() if k in ("ndcg@10", "recall@100", "mrr@10")}


def score_candidates(
    trained: Any,
    queries: Mapping[str, str],
    first: Mapping[str, Mapping[str, list[str]]],
    text_doc: Callable[[str], Any],
    condition: str,
) -> dict[str, dict[str, float]]:
    """Cross-encoder logits for the union of every protocol's candidates, once per pair."""
    from lodestar.evaluation.common import progress_bar

    qids = sorted(next(iter(first.values())))
    bar = progress_bar(f"car: score {condition}", unit="query")
    scores: dict[str, dict[str, float]] = {}
    for done, qid in enumerate(qids, start=1):
        candidates = list(
            dict.fromkeys(
                d
                for name, rankings in first.items()
                for d in rankings[qid][: RERANK_DEPTH if name == "rrf" else DEPTH]
            )
        )
        values = trained.score(queries[qid], [text_doc(d) for d in candidates], batch_size=64)
        scores[qid] = dict(zip(candidates, values, strict=True))
        bar(done, len(qids), "score")
    return scores


def synthetic_effects(
    pairs: Sequence[TrainPair], requested: int, filter_depth: int
) -> dict[str, Any]:
    """How many InPars queries were asked for and kept (the rest fell back or failed the
    retrieval filter), and a few of them with their CAR rewrite where there is one."""
    synthetic = [p for p in pairs if p.synthetic]
    if not requested:
        return {}
    return {
        "requested": requested,
        "kept": len(synthetic),
        "filter_depth": filter_depth or None,
        "examples": [
            {"doc_id": p.doc_id, "query": p.query, "car": p.rewrites.get("context")}
            for p in synthetic[:5]
        ],
    }


def rewrite_effects(
    pairs: Sequence[TrainPair],
    corpus: Mapping[str, Any],
    search: Callable[[str, int, tuple[str, ...]], tuple[list[str], list[float]]],
    modes: Sequence[str] = ("context", "query-only"),
) -> dict[str, Any]:
    """Where BM25 ranks each pair's relevant abstract for the original and each rewrite, how
    much of a rewrite is copied from the abstract, and examples that helped or drifted (the
    query-only rewrites when there are any, else the context ones that ranked it lower)."""

    def rank(query: str, doc_id: str) -> int:
        ranking, _ = search(query, DEPTH, ("bm25",))
        return ranking.index(doc_id) + 1 if doc_id in ranking else DEPTH + 1

    def copied(query: str, doc_id: str) -> float:
        words = [w for w in query.lower().split() if len(w) > 3]
        text = f"{corpus[doc_id].title} {corpus[doc_id].text}".lower()
        return sum(w in text for w in words) / len(words) if words else 0.0

    rows: list[dict[str, Any]] = []
    for pair in pairs:
        row: dict[str, Any] = {
            "qid": pair.qid,
            "original": pair.query,
            **{mode: pair.rewrites[mode] for mode in modes},
            "rank": {"original": rank(pair.query, pair.doc_id)},
            "copied": {"original": round(copied(pair.query, pair.doc_id), 3)},
        }
        for mode in modes:
            row["rank"][mode] = rank(pair.rewrites[mode], pair.doc_id)
            row["copied"][mode] = round(copied(pair.rewrites[mode], pair.doc_id), 3)
        rows.append(row)

    def mrr(mode: str) -> float:
        return round(sum(1.0 / r["rank"][mode] for r in rows) / len(rows), 4) if rows else 0.0

    if not modes:
        return {}
    drift_mode = "query-only" if "query-only" in modes else modes[0]
    helped = sorted(rows, key=lambda r: r["rank"][modes[0]] - r["rank"]["original"])[:5]
    drifted = sorted(rows, key=lambda r: r["rank"]["original"] - r["rank"][drift_mode])[:5]
    unchanged = {
        mode: sum(r[mode].strip().lower() == r["original"].strip().lower() for r in rows)
        for mode in modes
    }
    return {
        "modes": list(modes),
        "drift_mode": drift_mode,
        "bm25_mrr_of_relevant": {m: mrr(m) for m in ("original", *modes)},
        "mean_copied_words": {
            m: round(sum(r["copied"][m] for r in rows) / max(1, len(rows)), 3)
            for m in ("original", *modes)
        },
        "unchanged": unchanged,
        "helped": helped,
        "drifted": drifted,
    }


def second_set(limit: int) -> dict[str, Any]:
    """HotpotQA dev as a retrieval task: questions, their two supporting paragraphs as qrels,
    the pooled paragraphs as corpus, BM25 top 100 (bm25s with the index's settings)."""
    import bm25s
    import Stemmer

    from services.reranker.cross_encoder import TextDoc
    from shared.datasets import load_hotpotqa

    examples, documents = load_hotpotqa("dev")
    examples = examples[:limit]
    ids = [d.id for d in documents]
    stemmer = Stemmer.Stemmer("english")
    tokens = bm25s.tokenize(
        [f"{d.title} {d.text}" for d in documents],
        stopwords="en",
        stemmer=stemmer,
        show_progress=False,
    )
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(tokens, show_progress=False)
    rankings: dict[str, list[str]] = {}
    for example in examples:
        query = bm25s.tokenize(
            example.question, stopwords="en", stemmer=stemmer, show_progress=False
        )
        found, _ = retriever.retrieve(query, k=DEPTH, show_progress=False)
        rankings[example.id] = [ids[int(i)] for i in found[0]]
    by_id = {d.id: d for d in documents}
    return {
        "queries": {e.id: e.question for e in examples},
        "qrels": {e.id: dict.fromkeys(e.supporting_doc_ids, 1) for e in examples},
        "bm25": rankings,
        "doc": lambda doc_id: TextDoc(doc_id, by_id[doc_id].title, by_id[doc_id].text),
    }


def comparisons(
    per_query: Mapping[str, Mapping[str, Mapping[str, float]]],
    conditions: Sequence[str],
    *,
    dataset_name: str = "scifact",
) -> list[dict[str, Any]]:
    """Paired tests: each re-ranked system against its first stage, against the same
    protocol's original-trained model and, for a ``+synthetic`` condition, against its base."""
    from lodestar.evaluation.common import significance_table

    rows: list[dict[str, Any]] = []
    for name in per_query:
        if "+ce:" not in name:
            continue
        protocol, _, rest = name.partition("+ce:")
        base = "rrf" if protocol.startswith("rrf") else "bm25"
        references = [base]
        suffix = "+fusion" if rest.endswith("+fusion") else ""
        condition = rest.removesuffix("+fusion")
        # Against the original-trained model; a +synthetic one also against its base condition
        # (what the InPars queries add).
        for other in ("original", condition.removesuffix("+synthetic")):
            reference = f"{protocol}+ce:{other}{suffix}"
            if reference != name and reference in per_query and reference not in references:
                references.append(reference)
        for reference in references:
            for row in significance_table(
                {name: per_query[name], reference: per_query[reference]},
                ("ndcg@10", "recall@100"),
            ):
                rows.append({"dataset": dataset_name, **row})
    del conditions
    return rows


def publish_best(
    settings: Settings,
    config: CarConfig,
    result: Mapping[str, Any],
    models: Mapping[str, Any],
    publish: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Publish one condition's model as the served cross-encoder: the one named, or ``best`` by
    SciFact nDCG@10 of RRF top-50 re-ranking, and then only if it beats the first stage
    (``best-trained``: the best condition even so, e.g. to warm-start an offline update)."""
    chosen = config.publish or "best"
    if chosen in ("best", "best-trained"):
        chosen = max(models, key=lambda c: result["scifact"][f"rrf50+ce:{c}"]["ndcg@10"])
    if chosen not in models:
        raise ValueError(f"--publish {chosen!r}: not a trained condition ({', '.join(models)})")
    ndcg = result["scifact"][f"rrf50+ce:{chosen}"]["ndcg@10"]
    first_stage = result["scifact"]["rrf"]["ndcg@10"]
    if config.publish == "best" and ndcg <= first_stage:
        # Like the offline update: a model that re-ranks worse than no re-ranking is not served.
        return {
            "condition": chosen,
            "version": None,
            "refused": f"nDCG@10 {ndcg:.4f} does not beat the first stage's {first_stage:.4f}",
        }
    manifest = publish(
        settings,
        models[chosen],
        {
            "trained_by": "lodestar experiment car",
            "condition": chosen,
            "training": result["training"][chosen],
            "train_qids": result["data"]["train_qids"],
            "scifact_test": {
                k: v
                for k, v in result["scifact"].items()
                if k.endswith(f":{chosen}") or "+" not in k
            },
        },
    )
    return {"condition": chosen, "version": manifest["version"]}


# --- report -------------------------------------------------------------------------------------


def report_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# CAR: the cross-encoder trained on context-aware rewrites",
        "",
        "Command: `lodestar experiment car` (config below). Evaluation always on the original test "
        "queries.",
        "",
        f"Config: `{result['config']}`",
        "",
        f"Data: `{result['data']}`",
        "",
        "## SciFact test",
        "",
        "| system | nDCG@10 | R@100 | MRR@10 |",
        "|---|---:|---:|---:|",
    ]
    for name, values in result["scifact"].items():
        lines.append(
            f"| {name} | {values['ndcg@10']:.4f} | {values['recall@100']:.4f} | "
            f"{values['mrr@10']:.4f} |"
        )
    lines += [
        "",
        "## HotpotQA dev (cross-domain, BM25 top 100)",
        "",
        "| system | nDCG@10 | R@100 |",
    ]
    lines.append("|---|---:|---:|")
    for name, values in result["hotpotqa"].items():
        lines.append(f"| {name} | {values['ndcg@10']:.4f} | {values['recall@100']:.4f} |")
    lines += ["", "## Paired tests (t-test p, bootstrap p)", ""]
    lines.append("| set | a | b | metric | a | b | a − b | t p | boot p |")
    lines.append("|---|---|---|---|---:|---:|---:|---:|---:|")
    for row in result["significance"]:
        lines.append(
            f"| {row['dataset']} | {row['a']} | {row['b']} | {row['metric']} | {row['mean_a']:.4f} | "
            f"{row['mean_b']:.4f} | {row['mean_difference']:+.4f} | {row['t_test_p']:.3g} | "
            f"{row['bootstrap_p']:.3g} |"
        )
    rewrites = result["rewrites"]
    if rewrites:
        lines += _rewrite_lines(rewrites)
    synthetic = result["data"].get("synthetic")
    if synthetic:
        lines += [
            "",
            "## InPars synthetic queries",
            "",
            f"{synthetic['kept']} of {synthetic['requested']} kept (filter: the hybrid first "
            f"stage's top {synthetic['filter_depth']}). Examples (written → CAR rewrite):",
            "",
        ]
        lines += [f"- {e['doc_id']}: “{e['query']}” → “{e['car']}”" for e in synthetic["examples"]]
    lines += ["", "## Training", "", "| condition | examples | sources | train s | loss |"]
    lines.append("|---|---:|---|---:|---|")
    for condition, info in result["training"].items():
        lines.append(
            f"| {condition} | {info['examples']} | {info['sources']} | {info['train_seconds']} | "
            f"{info['loss'][0]} → {info['loss'][-1]} |"
        )
    if "published" in result:
        lines += ["", f"Published as the served cross-encoder: `{result['published']}`"]
    return "\n".join(lines) + "\n"


def _rewrite_lines(rewrites: Mapping[str, Any]) -> list[str]:
    # Results written before "modes" was recorded rewrote both modes.
    helped_mode = rewrites.get("modes", ["context"])[0]
    drift_mode = rewrites.get("drift_mode", "query-only")
    lines = [
        "",
        "## Rewrites",
        "",
        f"BM25 MRR of the relevant abstract: `{rewrites['bm25_mrr_of_relevant']}`; share of a "
        f"query's content words found in its abstract: `{rewrites['mean_copied_words']}`; "
        f"rewrites identical to the original: `{rewrites['unchanged']}`.",
        "",
        f"Rewrites that helped most (BM25 rank of the relevant abstract, original → {helped_mode}):",
        "",
    ]
    for row in rewrites["helped"]:
        lines.append(
            f"- {row['rank']['original']} → {row['rank'][helped_mode]}: “{row['original']}” → "
            f"“{row[helped_mode]}”"
        )
    lines += ["", f"{drift_mode} rewrites that drifted most (original → {drift_mode}):", ""]
    for row in rewrites["drifted"]:
        lines.append(
            f"- {row['rank']['original']} → {row['rank'][drift_mode]}: “{row['original']}” → "
            f"“{row[drift_mode]}”"
        )
    return lines


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(result["training"])
    protocols = [
        ("rrf50+ce", "rrf", "SciFact: RRF top 50"),
        ("bm25-100+ce", "bm25", "SciFact: BM25 top 100"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=False)
    for axis, (protocol, base, title) in zip(axes[:2], protocols, strict=True):
        values = [result["scifact"][f"{protocol}:{c}"]["ndcg@10"] for c in conditions]
        axis.bar(conditions, values, color="tab:blue")
        axis.axhline(result["scifact"][base]["ndcg@10"], color="black", ls="--", label=base)
        axis.set_title(title)
        axis.set_ylabel("nDCG@10")
        axis.tick_params(axis="x", rotation=30)
        axis.legend()
    values = [result["hotpotqa"][f"bm25-100+ce:{c}"]["ndcg@10"] for c in conditions]
    axes[2].bar(conditions, values, color="tab:green")
    axes[2].axhline(result["hotpotqa"]["bm25"]["ndcg@10"], color="black", ls="--", label="bm25")
    axes[2].set_title("HotpotQA dev: BM25 top 100")
    axes[2].tick_params(axis="x", rotation=30)
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- command ------------------------------------------------------------------------------------


def cmd_experiment_car(args: argparse.Namespace, settings: Settings) -> int:
    conditions = tuple(c for c in args.conditions.split(",") if c)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        print(f"unknown condition {unknown[0]!r}; known: {', '.join(CONDITIONS)}")
        return 2
    if args.publish not in (None, "none", "best", "best-trained", *conditions):
        print(
            "--publish must be best, best-trained, none or one of the conditions: "
            + ", ".join(conditions)
        )
        return 2
    config = CarConfig(
        train_queries=args.train_queries,
        steps=args.steps,
        batch_size=args.batch_size,
        negatives=args.negatives,
        loss=args.loss,
        learning_rate=args.lr,
        max_length=args.max_length,
        conditions=conditions,
        test_limit=args.test_limit,
        second_limit=args.second_limit,
        seed=args.seed,
        publish=None if args.publish == "none" else args.publish,
        synthetic=args.synthetic,
        synthetic_filter=args.synthetic_filter,
    )
    from lodestar.evaluation.common import option_below_one

    names = ("train_queries", "steps", "batch_size", "negatives", "max_length", "second_limit")
    problem = option_below_one(config, names)
    if problem:
        print(problem)
        return 2
    result = run_car(settings, config, Path(args.out))
    print(report_markdown(result))
    print(f"wrote {args.out}/car.json, car.md, car.png")
    return 0


def register(group: Any) -> None:
    parser = group.add_parser(
        "car", help="CAR: cross-encoders trained on original vs rewritten queries (SciFact)"
    )
    defaults = CarConfig()
    parser.add_argument("--train-queries", type=int, default=defaults.train_queries)
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="equal for every condition"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="queries per step"
    )
    parser.add_argument(
        "--negatives", type=int, default=defaults.negatives, help="per query per step"
    )
    parser.add_argument("--loss", choices=("pointwise", "listwise"), default=defaults.loss)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--test-limit", type=int, default=None, help="first N test claims only")
    parser.add_argument("--second-limit", type=int, default=defaults.second_limit)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--synthetic",
        type=int,
        default=defaults.synthetic,
        help="InPars queries SmolLM2 writes for sampled SciFact documents (+synthetic conditions)",
    )
    parser.add_argument(
        "--synthetic-filter",
        type=int,
        default=defaults.synthetic_filter,
        help="keep a synthetic query if the hybrid first stage ranks its document in this top k "
        "(0: keep all)",
    )
    parser.add_argument(
        "--publish",
        default="best",
        help="publish this condition's model as the served cross-encoder: best (only if it "
        "beats the first stage), best-trained (the best condition regardless), none, a name",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.set_defaults(handler=cmd_experiment_car)
