"""``lodestar experiment dsi``: the DSI++ continual-indexing protocol end to end.

Corpus: NQ-open oracle passages (each with its real NQ question). D0 holds half the documents and
D1..Dn split the rest. Half of D0's documents lend their real question to training (retrieval
task); every other question is held out for evaluation, so each corpus has evaluation queries whose
documents were never trained on a real query (the situation of a newly indexed corpus).

Steps: pseudo-queries for every document from the query generator (SmolLM2 prompted with D0's
first real (document, question) pairs, or a T5 trained on all of them);
train DSI on D0 (indexing + real + pseudo queries); then index D1..Dn with each method (naive,
SAM, generative memory, both, full retraining). After every step evaluate, on every corpus seen so
far, retrieval Hits@1/10 (held-out questions) and indexing Hits@1/10 (document prefix -> own docid)
by trie-constrained beam search over every docid seen so far; then compute A_n, F_n, LA_n,
forgetting events and model updates, and BM25 on the same documents and questions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from shared.settings import Settings

DEFAULT_OUT = Path("benchmarks/results/dsi")


@dataclass
class ProtocolConfig:
    docs: int = 300
    corpora: int = 5
    docid: str = "semantic"
    methods: tuple[str, ...] = ("naive", "sam", "genmem", "genmem+sam", "retrain")
    d_model: int = 128
    layers: int = 2
    d0_epochs: int = 30
    step_epochs: int = 10
    qg_epochs: int = 10
    # "lm": pretrained SmolLM2-135M-Instruct prompted with D0 pairs (the docT5query role);
    # "t5": a T5 of the DSI model's shape trained from scratch on D0's pairs.
    query_generator: str = "lm"
    demonstrations: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    sam_rho: float = 0.05
    pseudo_per_doc: int = 2
    replay_per_new_doc: int = 2
    doc_tokens: int = 32
    query_tokens: int = 32
    beam: int = 10
    leaf_size: int = 100
    clusters: int = 10
    seed: int = 0
    threads: int = 1
    # Worker processes: LM pseudo-query generation is sharded over them, and the methods run in
    # parallel after D0 (each with ``threads`` torch threads).
    jobs: int = 1
    # "every": retrain from scratch after every step (the full reference); "last": only on
    # D0..Dn at the end (the reference's final point, at a fraction of its cost).
    retrain: str = "every"


@dataclass
class CorpusSplit:
    docs: list[Any]  # shared.schemas.Document
    train_queries: dict[str, list[str]] = field(default_factory=dict)
    eval_queries: list[tuple[str, str]] = field(default_factory=list)  # (question, doc id)


def split_corpus(config: ProtocolConfig) -> list[CorpusSplit]:
    """D0 (half) and ``corpora`` equal new batches from NQ-open oracle passages."""
    from shared.datasets import load_nq_open_oracle

    examples, documents = load_nq_open_oracle()
    questions: dict[str, list[str]] = {}
    for example in examples:
        questions.setdefault(example.supporting_doc_ids[0], []).append(example.question)
    rng = random.Random(config.seed)
    pool = [d for d in documents if d.id in questions]
    rng.shuffle(pool)
    pool = pool[: config.docs]
    half = len(pool) // 2
    rest = len(pool) - half
    size = rest // config.corpora
    bounds = [(0, half)] + [
        (half + i * size, half + (i + 1) * size if i < config.corpora - 1 else len(pool))
        for i in range(config.corpora)
    ]
    splits: list[CorpusSplit] = []
    for index, (start, end) in enumerate(bounds):
        split = CorpusSplit(docs=pool[start:end])
        for position, doc in enumerate(split.docs):
            if index == 0 and position % 2 == 0:
                split.train_queries[doc.id] = questions[doc.id]
            else:
                split.eval_queries += [(q, doc.id) for q in questions[doc.id]]
        splits.append(split)
    return splits


def _evaluate(
    model: Any,
    scheme: Any,
    splits: list[CorpusSplit],
    step: int,
    config: ProtocolConfig,
) -> tuple[dict[str, list[float]], dict[str, bool]]:
    """Per corpus o <= step: retrieval and indexing Hits@1/@10; per document: indexing hit@1."""
    from services.dsi.continual import doc_text
    from services.dsi.docids import Docid
    from services.dsi.metrics import hits_at
    from services.dsi.model import build_trie, max_decode_steps
    from services.dsi.training import rank_docids

    seen: list[Docid] = [scheme.docid_of[d.id] for s in splits[: step + 1] for d in s.docs]
    trie = build_trie(model, seen)
    steps = max_decode_steps(seen)

    def ranked_ids(texts: list[str], max_tokens: int) -> list[list[str]]:
        ranked = rank_docids(
            model,
            texts,
            trie,
            beam=config.beam,
            max_tokens=max_tokens,
            max_steps=steps,
            to_docid=model.docid_of_symbols,
        )
        return [[scheme.doc_of[docid] for docid, _ in row] for row in ranked]

    row: dict[str, list[float]] = {"ret@1": [], "ret@10": [], "idx@1": [], "idx@10": []}
    correct: dict[str, bool] = {}
    for split in splits[: step + 1]:
        questions = [q for q, _ in split.eval_queries]
        gold = [{doc_id} for _, doc_id in split.eval_queries]
        ranked = ranked_ids(questions, config.query_tokens)
        row["ret@1"].append(hits_at(ranked, gold, 1))
        row["ret@10"].append(hits_at(ranked, gold, 10))
        ranked = ranked_ids([doc_text(d) for d in split.docs], config.doc_tokens)
        gold = [{d.id} for d in split.docs]
        row["idx@1"].append(hits_at(ranked, gold, 1))
        row["idx@10"].append(hits_at(ranked, gold, 10))
        for doc, docs in zip(split.docs, ranked, strict=True):
            correct[doc.id] = bool(docs) and docs[0] == doc.id
    return row, correct


def _bm25(splits: list[CorpusSplit]) -> dict[str, Any]:
    """BM25 (bm25s, English stop words and stemmer as the index service) over every document of
    the run: Hits@1/@10 on each corpus's held-out questions and on all of them."""
    import bm25s
    import Stemmer

    from services.dsi.continual import doc_text
    from services.dsi.metrics import hits_at

    docs = [d for s in splits for d in s.docs]
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(
            [doc_text(d) for d in docs], stopwords="en", stemmer=stemmer, show_progress=False
        ),
        show_progress=False,
    )

    def ranked_for(questions: list[str]) -> list[list[str]]:
        tokens = bm25s.tokenize(questions, stopwords="en", stemmer=stemmer, show_progress=False)
        indices, _ = retriever.retrieve(tokens, k=10, show_progress=False, n_threads=1)
        return [[docs[i].id for i in row] for row in indices.tolist()]

    result: dict[str, Any] = {"per_corpus": []}
    everything: list[tuple[str, str]] = []
    for split in splits:
        ranked = ranked_for([q for q, _ in split.eval_queries])
        gold = [{d} for _, d in split.eval_queries]
        result["per_corpus"].append(
            {"hits@1": hits_at(ranked, gold, 1), "hits@10": hits_at(ranked, gold, 10)}
        )
        everything += split.eval_queries
    ranked = ranked_for([q for q, _ in everything])
    gold = [{d} for _, d in everything]
    result["all"] = {
        "hits@1": hits_at(ranked, gold, 1),
        "hits@10": hits_at(ranked, gold, 10),
        "queries": len(everything),
    }
    return result


def _load_pseudo_queries(path: Path, docs: list[Any], config: ProtocolConfig) -> dict[str, Any]:
    """The pseudo-queries an earlier run wrote for this run's documents (generation is the
    slowest part of a run with the LM generator). Greedy LM generation with the same
    demonstrations is deterministic and a larger run's documents extend a smaller run's (same
    seed), so reused queries equal what this run would generate; the rest are generated."""
    saved = json.loads(path.read_text())
    if config.query_generator != "lm" or saved.get("query_generator") != "lm":
        raise SystemExit("--reuse-pseudo-queries: only LM-generated queries are reusable")
    if saved.get("demonstrations") != config.demonstrations or saved.get("per_doc") != (
        config.pseudo_per_doc
    ):
        raise SystemExit(f"{path} was generated with other demonstrations or queries per doc")
    return {d.id: saved["queries"][d.id] for d in docs if d.id in saved["queries"]}


def _docid_values(splits: list[CorpusSplit], scheme: Any, upto: int) -> int:
    """How many docid token values D0..D_upto need."""
    return int(max(max(scheme.docid_of[d.id]) for s in splits[: upto + 1] for d in s.docs)) + 1


def _examples_upto(
    splits: list[CorpusSplit], scheme: Any, pseudo: dict[str, list[str]], upto: int
) -> list[Any]:
    """Everything a from-scratch model may train on after D0..D_upto."""
    from services.dsi.continual import index_examples, query_examples

    docs = [d for s in splits[: upto + 1] for d in s.docs]
    return (
        index_examples(docs, scheme)
        + query_examples(splits[0].train_queries, scheme, "query")
        + query_examples({d.id: pseudo.get(d.id, []) for d in docs}, scheme, "pseudo")
    )


def _train_config(config: ProtocolConfig, epochs: int, *, sam: bool, seed: int) -> Any:
    from services.dsi.training import TrainConfig

    return TrainConfig(
        epochs=epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        sam_rho=config.sam_rho if sam else None,
        doc_tokens=config.doc_tokens,
        query_tokens=config.query_tokens,
        seed=seed,
    )


@dataclass
class _MethodContext:
    """What every method's run shares after D0 (picklable: it travels to worker processes)."""

    config: ProtocolConfig
    splits: list[CorpusSplit]
    scheme: Any  # services.dsi.docids.DocidScheme
    pseudo: dict[str, list[str]]
    row0: dict[str, list[float]]
    correct0: dict[str, bool]
    d0_loss: list[float]


def _run_method(
    name: str,
    base: Any,
    context: _MethodContext,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Index D1..Dn with one method starting from the D0 model ``base``, evaluating after every
    step. Retraining with ``retrain="last"`` trains and evaluates only at the last step (its
    intermediate rows are None)."""
    import torch

    from services.dsi.continual import METHODS, step_examples
    from services.dsi.metrics import (
        average_performance,
        forgetting,
        forgetting_events,
        learning_accuracy,
    )
    from services.dsi.model import T5Dsi
    from services.dsi.training import train

    config, splits, scheme, pseudo = context.config, context.splits, context.scheme, context.pseudo
    n_steps = len(splits)
    method = METHODS[name]
    rng = random.Random(config.seed)
    model = base.copy()
    rows: list[dict[str, list[float]] | None] = [context.row0]
    previous = context.correct0
    events: list[int | None] = [0]
    updates: list[int] = [0]
    passes: list[int] = [0]
    seconds: list[float] = [0.0]
    curves: list[list[float]] = [context.d0_loss]
    for step in range(1, n_steps):
        if method.retrain and config.retrain == "last" and step < n_steps - 1:
            rows.append(None)
            events.append(None)
            updates.append(0)
            passes.append(0)
            seconds.append(0.0)
            curves.append([])
            if progress is not None:
                progress(f"{name} D{step} skipped")
            continue
        # Dropout draws from torch's global generator: seed it per step so a method's result does
        # not depend on what ran before it in the process (sequential vs --jobs).
        torch.manual_seed(config.seed + step)
        if method.retrain:
            model = T5Dsi(base.shape, base.tokenizer, seed=config.seed)
            model.ensure_docid_tokens(_docid_values(splits, scheme, step))
            stats = train(
                model,
                _examples_upto(splits, scheme, pseudo, step),
                _train_config(config, config.d0_epochs, sam=False, seed=config.seed + step),
            )
        else:
            model.ensure_docid_tokens(_docid_values(splits, scheme, step))
            examples = step_examples(
                method,
                splits[step].docs,
                [d.id for s in splits[:step] for d in s.docs],
                scheme,
                pseudo,
                replay_per_new_doc=config.replay_per_new_doc,
                rng=rng,
            )
            stats = train(
                model,
                examples,
                _train_config(config, config.step_epochs, sam=method.sam, seed=config.seed + step),
            )
        row, correct = _evaluate(model, scheme, splits, step, config)
        count, _ = forgetting_events(previous, correct)
        previous = correct
        rows.append(row)
        events.append(count)
        updates.append(stats.updates)
        passes.append(stats.passes)
        seconds.append(round(stats.seconds, 1))
        curves.append(stats.epoch_loss)
        if progress is not None:
            progress(f"{name} D{step} done")
    complete = all(r is not None for r in rows)
    metrics: dict[str, Any] = {}
    for key in ("ret@1", "ret@10", "idx@1", "idx@10"):
        matrix = [r[key] if r is not None else None for r in rows]
        filled = [m if m is not None else [] for m in matrix]
        metrics[key] = {
            "P": matrix,
            # A_n needs only row n; F_n and LA_n need every earlier row.
            "A": [
                average_performance(filled, n) if m is not None else None
                for n, m in enumerate(matrix)
            ],
            "F": [forgetting(filled, n) for n in range(n_steps)] if complete else None,
            "LA": [learning_accuracy(filled, n) for n in range(n_steps)] if complete else None,
        }
    return {
        "metrics": metrics,
        "steps_trained": [n for n, r in enumerate(rows) if r is not None],
        "forgetting_events": events,
        "forgetting_events_total": sum(e for e in events if e is not None),
        "updates": updates,
        "updates_total": sum(updates),
        "passes": passes,
        "passes_total": sum(passes),
        "train_seconds": seconds,
        "epoch_loss": curves,
    }


def _run_method_from_checkpoint(
    name: str, base_dir: Path, context: _MethodContext
) -> dict[str, Any]:
    """A worker process's entry: load the saved D0 model, then run one method."""
    import torch

    from services.dsi.model import T5Dsi

    torch.set_num_threads(context.config.threads)
    return _run_method(name, T5Dsi.load(base_dir), context)


def _run_methods_in_workers(
    base_dir: Path, context: _MethodContext, progress: Callable[[int], Any]
) -> dict[str, Any]:
    """Every method in its own worker process, each starting from the D0 model in ``base_dir``;
    ``progress`` gets the number of steps a finished method ran."""
    from services.dsi.continual import METHODS

    config = context.config
    results: dict[str, Any] = {}
    with _worker_pool(config.jobs) as pool:
        # Retraining is the longest: start it first so the others fill the other workers.
        longest_first = sorted(config.methods, key=lambda name: not METHODS[name].retrain)
        futures = {
            pool.submit(_run_method_from_checkpoint, name, base_dir, context): name
            for name in longest_first
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            progress(len(context.splits) - 1)
    return results


def _lm_pseudo_queries(
    settings: Settings,
    config: ProtocolConfig,
    demonstrations: list[tuple[str, str]],
    docs: list[Any],
    shard: int,
) -> dict[str, list[str]]:
    """Pseudo-queries for one shard of the documents (one worker process per shard)."""
    import torch
    from tqdm import tqdm

    from services.dsi.continual import generate_pseudo_queries_lm
    from shared.llm import chat_generator

    torch.set_num_threads(config.threads)
    with tqdm(
        total=len(docs), desc=f"pseudo-queries {shard}", unit="doc", position=shard, leave=False
    ) as bar:
        return generate_pseudo_queries_lm(
            chat_generator(settings),
            docs,
            config.pseudo_per_doc,
            demonstrations,
            progress=lambda _done, _total: bar.update(1),
        )


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent has torch (and its thread pools) loaded.
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


def run_protocol(
    config: ProtocolConfig, out_dir: Path, settings: Settings, reuse_pseudo: Path | None = None
) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from services.dsi.continual import generate_pseudo_queries, train_query_generator
    from services.dsi.docids import DocidScheme
    from services.dsi.model import T5Dsi, T5Shape, text_tokenizer
    from services.dsi.training import train
    from shared.models import get_embedder

    torch.set_num_threads(config.threads)  # more threads than free cores slows torch down badly
    started = time.perf_counter()
    splits = split_corpus(config)
    all_docs = [d for s in splits for d in s.docs]
    n_steps = len(splits)
    units = 2 + len(config.methods) * (n_steps - 1)
    bar = tqdm(total=units, desc="dsi protocol", unit="stage")

    # Docids: the hierarchy is fitted on D0; later corpora descend it (old ids never change).
    embeddings = get_embedder(settings).encode([f"{d.title}. {d.text}" for d in all_docs])
    d0 = splits[0].docs
    scheme = DocidScheme.create(
        config.docid,  # type: ignore[arg-type]
        [d.id for d in d0],
        embeddings[: len(d0)],
        k=config.clusters,
        leaf_size=config.leaf_size,
        seed=config.seed,
    )
    scheme.extend([d.id for d in all_docs[len(d0) :]], embeddings[len(d0) :])
    shape = T5Shape(d_model=config.d_model, layers=config.layers, d_ff=config.d_model * 4)
    tokenizer = text_tokenizer()  # the DSI model's (and the T5 query generator's) vocabulary

    # Generative memory: a doc -> query generator that learns from D0's real pairs only.
    by_id = {d.id: d for d in all_docs}
    from services.dsi.continual import doc_text

    pairs = [(doc_text(by_id[i]), q) for i, qs in splits[0].train_queries.items() for q in qs]
    bar.set_postfix_str("query generator")
    qg_updates = 0
    if config.query_generator == "lm":
        from shared.models import LLM_ID

        demonstrations = pairs[: config.demonstrations]
        pseudo = _load_pseudo_queries(reuse_pseudo, all_docs, config) if reuse_pseudo else {}
        todo = [d for d in all_docs if d.id not in pseudo]
        shards = [todo[i :: config.jobs] for i in range(config.jobs) if todo[i :: config.jobs]]
        if len(shards) > 1:
            shard_job = partial(_lm_pseudo_queries, settings, config, demonstrations)
            with _worker_pool(len(shards)) as pool:
                for shard_queries in pool.map(shard_job, shards, range(len(shards))):
                    pseudo |= shard_queries
        elif shards:
            pseudo |= _lm_pseudo_queries(settings, config, demonstrations, shards[0], 0)
        generator_kind = f"{LLM_ID}, {len(demonstrations)} D0 pairs as demonstrations"
    else:
        generator, qg_updates = train_query_generator(
            pairs,
            shape=shape,
            epochs=config.qg_epochs,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        pseudo = generate_pseudo_queries(
            generator, all_docs, config.pseudo_per_doc, seed=config.seed
        )
        generator_kind = "T5 of the DSI shape trained from scratch on D0's pairs"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pseudo_queries.json").write_text(
        json.dumps(
            {
                "query_generator": config.query_generator,
                "kind": generator_kind,
                "demonstrations": config.demonstrations,
                "per_doc": config.pseudo_per_doc,
                "queries": pseudo,
            }
        )
    )
    bar.update(1)

    # D0: shared starting point of every continual method (and retraining's step 0).
    bar.set_postfix_str("D0")
    base = T5Dsi(shape, tokenizer, seed=config.seed)
    base.ensure_docid_tokens(_docid_values(splits, scheme, 0))
    d0_stats = train(
        base,
        _examples_upto(splits, scheme, pseudo, 0),
        _train_config(config, config.d0_epochs, sam=False, seed=config.seed),
    )
    row0, correct0 = _evaluate(base, scheme, splits, 0, config)
    bar.update(1)

    def step_done(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    context = _MethodContext(config, splits, scheme, pseudo, row0, correct0, d0_stats.epoch_loss)
    results: dict[str, Any] = {}
    if config.jobs > 1 and len(config.methods) > 1:
        # Methods are independent once D0 is trained: each worker process starts from the saved
        # D0 model, with the same seeds as the sequential path.
        # A temporary directory: removed even when a worker fails.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix="d0_model.") as handover:
            base_dir = Path(handover)
            base.save(base_dir)
            results = _run_methods_in_workers(base_dir, context, progress=bar.update)
        results = {name: results[name] for name in config.methods}
    else:
        for name in config.methods:
            results[name] = _run_method(name, base, context, progress=step_done)
    bar.close()

    report: dict[str, Any] = {
        "experiment": "dsi++ continual indexing",
        "config": asdict(config),
        "corpus": "nq-open oracle passages (lost-in-the-middle), NQ-open dev questions",
        "corpora": [
            {
                "docs": len(s.docs),
                "train_queries": sum(len(q) for q in s.train_queries.values()),
                "eval_queries": len(s.eval_queries),
            }
            for s in splits
        ],
        "docid_depths": sorted({len(d) for d in scheme.doc_of}),
        "model": {
            "kind": "t5 from config (MiniLM tokenizer)",
            **asdict(shape),
            "parameters": sum(p.numel() for p in base.parameters()),
        },
        "query_generator": {
            "kind": generator_kind,
            "pairs": len(pairs),
            "updates": qg_updates,
            "samples": [
                {"doc": doc_text(by_id[d.id])[:160], "pseudo_queries": pseudo.get(d.id, [])}
                for d in splits[1].docs[:3]
            ],
        },
        "d0": {
            "updates": d0_stats.updates,
            "seconds": round(d0_stats.seconds, 1),
            "epoch_loss": d0_stats.epoch_loss,
        },
        "methods": results,
        "bm25": _bm25(splits),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {config.jobs} process(es) x {config.threads} torch thread(s), shared CPU under load",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "protocol.json").write_text(json.dumps(report, indent=2))
    _plot(report, out_dir)
    (out_dir / "REPORT.md").write_text(render_report(report))
    return report


def _plot(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    for key, label, filename in (
        ("ret@10", "retrieval Hits@10 (held-out questions)", "forgetting_retrieval_hits10.png"),
        ("idx@10", "indexing Hits@10 (doc prefix -> docid)", "forgetting_indexing_hits10.png"),
    ):
        fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), sharey=True)
        for ax, (name, data) in zip(np.atleast_1d(axes), methods.items(), strict=True):
            matrix = data["metrics"][key]["P"]
            for o in range(len(matrix)):
                xs = [n for n in range(o, len(matrix)) if matrix[n] is not None]
                ax.plot(xs, [matrix[n][o] for n in xs], marker="o", label=f"D{o}")
            ax.set_title(name)
            ax.set_xlabel("after training on D_n")
            ax.grid(alpha=0.3)
        np.atleast_1d(axes)[0].set_ylabel(label)
        np.atleast_1d(axes)[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _at(values: list[Any] | None, n: int) -> Any:
    """``values[n]``, or None where a metric was not computed (retraining at the last step only)."""
    return None if values is None else values[n]


def render_report(report: dict[str, Any]) -> str:
    config = report["config"]
    methods = report["methods"]
    last = len(report["corpora"]) - 1
    lines = [
        "# DSI++ continual indexing — measured on this machine",
        "",
        f"Corpus: {report['corpus']}; {config['docs']} documents, D0 = {report['corpora'][0]['docs']}, "
        f"then {last} corpora of {report['corpora'][1]['docs']}. Docids: {config['docid']} "
        f"(depths {report['docid_depths']}). Model: {report['model']['kind']}, d_model "
        f"{report['model']['d_model']}, {report['model']['layers']}+{report['model']['layers']} layers, "
        f"{report['model']['parameters'] / 1e6:.1f} M parameters. SAM rho {config['sam_rho']}; "
        f"{config['pseudo_per_doc']} pseudo-queries per document; replay {config['replay_per_new_doc']} "
        f"old pseudo-queries per new document. Wall time {report['wall_seconds'] / 60:.1f} min ({report['machine']}).",
        "",
        f"## After the last step (n = {last})",
        "",
        "Percentages. ret = held-out real questions (retrieval), idx = document prefix -> own docid "
        "(indexing / memorisation). Updates = optimiser steps over D1..Dn (SAM: 2 passes each).",
        "",
        "| method | A ret@10 | F ret@10 | LA ret@10 | A ret@1 | A idx@1 | F idx@1 | LA idx@1 | forgetting events | updates | passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in methods.items():
        m = data["metrics"]
        lines.append(
            f"| {name} | {_pct(m['ret@10']['A'][last])} | {_pct(_at(m['ret@10']['F'], last))} | "
            f"{_pct(_at(m['ret@10']['LA'], last))} | {_pct(m['ret@1']['A'][last])} | "
            f"{_pct(m['idx@1']['A'][last])} | {_pct(_at(m['idx@1']['F'], last))} | "
            f"{_pct(_at(m['idx@1']['LA'], last))} | {data['forgetting_events_total']} | "
            f"{data['updates_total']} | {data['passes_total']} |"
        )
    lines += ["", "## D0 after each step (forgetting of the initial corpus)", ""]
    header = "| method | " + " | ".join(f"after D{n}" for n in range(last + 1)) + " |"
    lines += ["indexing Hits@1 on D0:", "", header, "|---" * (last + 2) + "|"]
    for name, data in methods.items():
        matrix = data["metrics"]["idx@1"]["P"]
        lines.append(
            f"| {name} | " + " | ".join(_pct(_at(matrix[n], 0)) for n in range(last + 1)) + " |"
        )
    lines += [
        "",
        "retrieval Hits@10 on D0's held-out questions:",
        "",
        header,
        "|---" * (last + 2) + "|",
    ]
    for name, data in methods.items():
        matrix = data["metrics"]["ret@10"]["P"]
        lines.append(
            f"| {name} | " + " | ".join(_pct(_at(matrix[n], 0)) for n in range(last + 1)) + " |"
        )
    bm25 = report["bm25"]
    lines += [
        "",
        "## Retrieval beside BM25 (same documents, same held-out questions)",
        "",
        f"BM25 over all {config['docs']} documents, {bm25['all']['queries']} questions: "
        f"Hits@1 {_pct(bm25['all']['hits@1'])}, Hits@10 {_pct(bm25['all']['hits@10'])}.",
        "",
        "| system (after the last step) | "
        + " | ".join(f"D{o} @10" for o in range(last + 1))
        + " |",
        "|---" * (last + 2) + "|",
        "| BM25 | " + " | ".join(_pct(c["hits@10"]) for c in bm25["per_corpus"]) + " |",
    ]
    for name, data in methods.items():
        row = data["metrics"]["ret@10"]["P"][last]
        lines.append(f"| DSI {name} | " + " | ".join(_pct(x) for x in row) + " |")
    lines += [
        "",
        "Plots: `forgetting_retrieval_hits10.png`, `forgetting_indexing_hits10.png` (Hits@10 on each "
        "D_o after each step, one panel per method).",
        "",
        f"Pseudo-query samples ({report['query_generator']['kind']}):",
        "",
    ]
    for sample in report["query_generator"]["samples"]:
        lines.append(f"- `{sample['doc'][:100]}…` → {sample['pseudo_queries']}")
    lines.append("")
    return "\n".join(lines)


def compare_models(
    out_dir: Path,
    settings: Settings,
    *,
    docs: int = 24,
    epochs: int = 8,
    long_epochs: int = 60,
    only: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """The measured model choice: a small T5 from a config vs SmolLM2-135M fine-tuned as a
    decoder-only docid generator, trained the same number of epochs on the indexing task of the
    same documents (semantic docids), each at a learning rate suited to it (from scratch: 1e-3;
    pretrained: 1e-4). Reports seconds per update and indexing Hits@1/@2 (beam 2) after training.
    A third row trains the T5 for ``long_epochs``, still far less wall time than SmolLM2's short
    run. ``only`` re-measures one row; rows are merged into ``model_choice.json`` by (model,
    epochs)."""
    import torch

    from services.dsi.continual import doc_text, index_examples
    from services.dsi.docids import DocidScheme
    from services.dsi.metrics import hits_at
    from services.dsi.model import CausalDsi, T5Dsi, T5Shape, build_trie, max_decode_steps
    from services.dsi.training import TrainConfig, rank_docids, train
    from shared.models import get_embedder, llm_dir, prepare_llm

    torch.set_num_threads(threads)
    corpus = split_corpus(ProtocolConfig(docs=2 * docs))[0].docs[:docs]
    embeddings = get_embedder(settings).encode([doc_text(d) for d in corpus])
    scheme = DocidScheme.create("semantic", [d.id for d in corpus], embeddings, leaf_size=10)
    examples = index_examples(corpus, scheme)

    def smollm2() -> Any:
        prepare_llm(settings)
        return CausalDsi(llm_dir(settings))

    candidates: list[tuple[str, str, Any, float, int]] = [
        ("t5-from-config", "t5-from-config", lambda: T5Dsi(T5Shape()), 1e-3, epochs),
        ("smollm2-135m", "smollm2-135m", smollm2, 1e-4, epochs),
        ("t5-long", "t5-from-config", lambda: T5Dsi(T5Shape()), 1e-3, long_epochs),
    ]
    path = out_dir / "model_choice.json"
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = {(r["model"], r.get("epochs", epochs)): r for r in previous}
    for key, name, factory, lr, model_epochs in candidates:
        if only is not None and key != only:
            continue
        model = factory()
        model.ensure_docid_tokens(scheme.max_token_value + 1)
        stats = train(
            model, examples, TrainConfig(epochs=model_epochs, batch_size=8, lr=lr, warmup_steps=5)
        )
        valid = list(scheme.doc_of)
        ranked = rank_docids(
            model,
            [e.text for e in examples],
            build_trie(model, valid),
            beam=2,  # SmolLM2 re-reads the whole prompt per decoding step: keep the search small
            max_tokens=32,
            max_steps=max_decode_steps(valid),
            batch_size=8,
            to_docid=model.docid_of_symbols,
        )
        ids = [[scheme.doc_of[d] for d, _ in row] for row in ranked]
        gold = [{d.id} for d in corpus]
        rows[(name, model_epochs)] = {
            "model": name,
            "epochs": model_epochs,
            "parameters": sum(p.numel() for p in model.parameters()),
            "lr": lr,
            "updates": stats.updates,
            "seconds_per_update": round(stats.seconds / max(1, stats.updates), 3),
            "train_seconds": round(stats.seconds, 1),
            "final_loss": round(stats.epoch_loss[-1], 4),
            "indexing_hits@1": hits_at(ids, gold, 1),
            "indexing_hits@2": hits_at(ids, gold, 2),
        }
        del model
    result = {
        "experiment": "dsi model choice",
        "documents": docs,
        "batch_size": 8,
        "torch_threads": threads,
        "note": "shared 2-core CPU under heavy load from other jobs: compare ratios, not absolutes",
        "rows": list(rows.values()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def cmd_experiment_dsi(args: argparse.Namespace, settings: Settings) -> int:
    if args.compare_models:
        choice = compare_models(
            Path(args.out), settings, only=args.compare_only, threads=args.threads
        )
        print(json.dumps(choice["rows"], indent=2))
        return 0
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be at least 1")
    config = ProtocolConfig(
        docs=args.docs,
        corpora=args.corpora,
        docid=args.docid,
        methods=tuple(args.methods.split(",")),
        d_model=args.d_model,
        layers=args.layers,
        d0_epochs=args.d0_epochs,
        step_epochs=args.step_epochs,
        qg_epochs=args.qg_epochs,
        query_generator=args.query_generator,
        lr=args.lr,
        sam_rho=args.sam_rho,
        pseudo_per_doc=args.pseudo_per_doc,
        seed=args.seed,
        threads=args.threads,
        jobs=args.jobs,
        retrain=args.retrain,
    )
    reuse = Path(args.reuse_pseudo_queries) if args.reuse_pseudo_queries else None
    report = run_protocol(config, Path(args.out), settings, reuse)
    print(render_report(report))
    return 0


def register(group: Any) -> None:
    parser = group.add_parser(
        "dsi", help="DSI++ continual indexing protocol (D0 + D1..Dn, 5 methods)"
    )
    parser.add_argument("--docs", type=int, default=ProtocolConfig.docs)
    parser.add_argument("--corpora", type=int, default=ProtocolConfig.corpora)
    parser.add_argument("--docid", choices=("atomic", "naive", "semantic"), default="semantic")
    parser.add_argument("--methods", default=",".join(ProtocolConfig.methods))
    parser.add_argument("--d-model", type=int, default=ProtocolConfig.d_model)
    parser.add_argument("--layers", type=int, default=ProtocolConfig.layers)
    parser.add_argument("--d0-epochs", type=int, default=ProtocolConfig.d0_epochs)
    parser.add_argument("--step-epochs", type=int, default=ProtocolConfig.step_epochs)
    parser.add_argument("--qg-epochs", type=int, default=ProtocolConfig.qg_epochs)
    parser.add_argument(
        "--query-generator",
        choices=("lm", "t5"),
        default=ProtocolConfig.query_generator,
        help="pseudo-queries from pretrained SmolLM2 prompted with D0 pairs (lm) or from a T5 "
        "trained from scratch on them (t5)",
    )
    parser.add_argument("--lr", type=float, default=ProtocolConfig.lr, help="peak learning rate")
    parser.add_argument("--sam-rho", type=float, default=ProtocolConfig.sam_rho)
    parser.add_argument("--pseudo-per-doc", type=int, default=ProtocolConfig.pseudo_per_doc)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes for LM pseudo-query generation and for the methods after D0",
    )
    parser.add_argument(
        "--retrain",
        choices=("every", "last"),
        default=ProtocolConfig.retrain,
        help="retraining reference after every step, or only after the last (cheaper)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument(
        "--reuse-pseudo-queries",
        metavar="JSON",
        help="pseudo_queries.json of an earlier run on the same documents (skips generation)",
    )
    parser.add_argument(
        "--compare-models",
        action="store_true",
        help="instead of the protocol: measure small T5 vs SmolLM2-135M on the indexing task",
    )
    parser.add_argument(
        "--compare-only",
        choices=("t5-from-config", "smollm2-135m", "t5-long"),
        help="with --compare-models: re-measure one row only",
    )
    parser.set_defaults(handler=cmd_experiment_dsi)
