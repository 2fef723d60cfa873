"""NExT-Search's offline update of the reranker: fine-tune the cross-encoder on relevance labels
exported from feedback and publish the new version **only if it is better** on held-out queries.

Input: ``rel_label`` rows as ``GET /feedback/export`` writes them (``services.orchestrator.
feedback_export``; plain dicts, so this package does not depend on the orchestrator). Steps:

1. group the labels by query (lower-cased, whitespace-normalised text) and split the queries
   deterministically (a seeded hash of the query) into train and held-out (``eval_fraction``,
   at least one of each);
2. training examples: each positive label (``relevant``/``pin``) with its hard negatives (the
   trace's other ranked documents not judged relevant), weighted by the label's ``weight``
   (user 1, shadow lower);
3. held-out set per query: its labelled documents and their hard negatives; relevance 1 for a
   positive label, 0 otherwise (a user's label wins over a shadow agent's, the latest within a
   source); only queries with a positive are scored;
4. "before" = nDCG@10 of the serving model re-ranking each held-out candidate set (the current
   cross-encoder; with none published, the first-stage order the user saw, which is what the
   reranker serves then); "after" = the same for the model fine-tuned from the current version
   (or from the MiniLM body);
5. publish atomically iff ``after > before + min_gain`` (a tie is not an improvement) **and** a
   one-sided paired randomization test over the held-out queries gives ``p <= max_p``: a mean
   gain on a few dozen queries is within their noise (measured: a +0.012 held-out gain went
   with a -0.019 test loss), so the gate asks for evidence, not a lucky draw. If another
   version was published while training, "before" is measured again on it first.

``replay`` mixes in examples the serving version was trained on (published beside it,
``EXAMPLES_FILE``), ``replay`` of them per feedback example: rehearsal, as DSI++ replays pseudo-
queries, so that a few hundred feedback labels on the first stage's confusions do not overwrite
what the model learnt from its training set.

``queries`` applies CAR to the feedback (step 2): ``car`` trains on each labelled query rewritten
by the LLM with the document the user marked relevant, ``original+car`` on both, ``original``
on the query as typed. The rewrite is an injected callable (the worker composes the rewriter);
test and serving queries are never rewritten.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from services.reranker.cross_encoder import (
    MODEL_DIR,
    CrossEncoderTrainConfig,
    CurrentCrossEncoder,
    RankingExample,
    TextDoc,
    TrainedCrossEncoder,
    cross_encoder_family,
    load_cross_encoder,
    publish_cross_encoder,
    read_examples,
    train_cross_encoder,
)
from shared.errors import ErrorCode, LodestarError
from shared.metrics import evaluate_run, paired_randomization
from shared.models import resolve_device
from shared.settings import Settings

Progress = Callable[[int, int, str], None]
#: ``texts(collection, doc_ids)`` → the documents found (unknown ids left out).
TextSource = Callable[[str, Sequence[str]], Mapping[str, TextDoc]]
Scorer = Callable[[str, Sequence[TextDoc]], list[float]]
#: ``rewrite(items) -> one query per item``; an item is (query key, query, its positive).
Rewrite = Callable[[Sequence[tuple[str, str, TextDoc]]], list[str]]
#: Which queries the feedback examples train on (CAR's conditions, applied to feedback).
QUERY_MODES = ("original", "car", "original+car")
METRIC = "ndcg@10"
POSITIVE = frozenset({"relevant", "pin"})


class InsufficientFeedback(LodestarError):
    """Too few usable labels: the job's request was valid, the feedback store's state is not
    enough yet (409 ``conflict``, as ``POST /jobs/offline-update`` answers before enqueueing)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.conflict, message, field="min_examples")


@dataclass(frozen=True)
class OfflineUpdateConfig:
    min_examples: int = 8
    """Fewest positive relevance labels (with a negative) to train on; fewer fails the job."""
    eval_fraction: float = 0.25
    """Share of the labelled queries held out for the before/after comparison."""
    min_gain: float = 0.0
    """Publish only when held-out nDCG@10 rises by more than this."""
    max_p: float = 0.05
    """... and only when the paired randomization test of the rise gives p at most this (1
    turns the test off). With m held-out queries the smallest p is 2^-m: at the default an
    update needs at least 5 held-out queries with a positive label."""
    replay: float = 1.0
    """Examples replayed from the serving version's own training set per feedback example
    (measured: test nDCG@10 +0.019 with 1 against +0.001 with 0, docs/feedback.md)."""
    seed: int = 13
    train: CrossEncoderTrainConfig = field(default_factory=CrossEncoderTrainConfig)
    queries: str = "original"
    """``original``, ``car`` (the LLM rewrite of each labelled query with its relevant document)
    or ``original+car``; the CAR modes need a ``rewrite`` callable."""

    def __post_init__(self) -> None:
        if self.queries not in QUERY_MODES:
            raise ValueError(f"queries must be one of {', '.join(QUERY_MODES)}")
        if self.min_examples < 1:
            raise ValueError("min_examples must be at least 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be between 0 and 1 (exclusive)")
        if not 0.0 < self.max_p <= 1.0:
            raise ValueError("max_p must be in (0, 1]")
        if self.replay < 0:
            raise ValueError("replay must be at least 0")


def query_key(query: str) -> str:
    return " ".join(query.lower().split())


def split_queries(
    keys: Sequence[str], eval_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """(train, held-out) query keys: sorted by a seeded hash, the first ``eval_fraction`` (at
    least one, and never all) held out. Deterministic, independent of the input order."""
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if len(unique) < 2:
        raise InsufficientFeedback(
            f"the feedback names {len(unique)} distinct query; an offline update needs at least "
            "2 (one to train on, one to hold out)"
        )
    held = min(len(unique) - 1, max(1, math.ceil(eval_fraction * len(unique))))
    return set(unique[held:]), set(unique[:held])


def positive_labels(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        r
        for r in rows
        if r.get("type") == "rel_label" and int(r.get("label", 0)) == 1 and r.get("hard_negatives")
    ]


@dataclass
class HeldOutQuery:
    query: str
    candidates: dict[str, int | None] = field(default_factory=dict)
    """doc id → first-stage rank (None when unknown)."""
    labels: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    """doc id → (source priority: user 1 / shadow 0, label, created_at)."""

    def qrels(self) -> dict[str, int]:
        judged = {doc: label for doc, (_, label, _) in self.labels.items()}
        return {doc: judged.get(doc, 0) for doc in self.candidates}


def held_out_sets(rows: Sequence[Mapping[str, Any]], keys: set[str]) -> dict[str, HeldOutQuery]:
    sets: dict[str, HeldOutQuery] = {}
    for row in rows:
        if row.get("type") != "rel_label":
            continue
        key = query_key(str(row["query"]))
        if key not in keys:
            continue
        entry = sets.setdefault(key, HeldOutQuery(str(row["query"])))
        doc_id = str(row["doc_id"])
        _merge_rank(entry.candidates, doc_id, row.get("rank"))
        for position, negative in enumerate(row.get("hard_negatives") or []):
            ranks = row.get("negative_ranks") or []
            _merge_rank(
                entry.candidates, str(negative), ranks[position] if position < len(ranks) else None
            )
        label = (1 if row["source"] == "user" else 0, int(row["label"]), float(row["created_at"]))
        previous = entry.labels.get(doc_id)
        if (
            previous is None
            or label[0] > previous[0]
            or (label[0] == previous[0] and label[2] >= previous[2])
        ):
            entry.labels[doc_id] = label
    return {k: v for k, v in sets.items() if any(v.qrels().values())}


def _merge_rank(candidates: dict[str, int | None], doc_id: str, rank: Any) -> None:
    value = int(rank) if isinstance(rank, int) else None
    known = candidates.get(doc_id)
    if doc_id not in candidates or (value is not None and (known is None or value < known)):
        candidates[doc_id] = value


def training_examples(
    rows: Sequence[Mapping[str, Any]], keys: set[str], texts: Mapping[str, TextDoc]
) -> list[RankingExample]:
    examples: list[RankingExample] = []
    for row in positive_labels(rows):
        key = query_key(str(row["query"]))
        positive = texts.get(str(row["doc_id"]))
        negatives = tuple(texts[d] for d in row["hard_negatives"] if d in texts)
        if key not in keys or positive is None or not negatives:
            continue
        examples.append(
            RankingExample(
                qid=key,
                query=str(row["query"]),
                positive=positive,
                negatives=negatives,
                source=f"feedback:{row['source']}",
                weight=float(row.get("weight", 1.0)),
            )
        )
    return examples


def with_rewrites(
    examples: Sequence[RankingExample], queries: str, rewrite: Rewrite | None
) -> list[RankingExample]:
    """The examples ``queries`` trains on: as typed, CAR-rewritten with their positive, or
    both (the rewritten copy keeps the label's weight; its source gains ``+car``)."""
    if queries == "original":
        return list(examples)
    if rewrite is None:
        raise ValueError(f"queries={queries!r} needs a rewriter; none was given")
    rewritten = rewrite([(e.qid, e.query, e.positive) for e in examples])
    car = [
        replace(e, query=q, source=f"{e.source}+car")
        for e, q in zip(examples, rewritten, strict=True)
    ]
    return car if queries == "car" else [*examples, *car]


def evaluate_held_out(
    scorer: Scorer | None, sets: Mapping[str, HeldOutQuery], texts: Mapping[str, TextDoc]
) -> tuple[float, dict[str, float]]:
    """Mean and per-query nDCG@10 of ``scorer`` re-ranking each held-out candidate set (by
    first-stage rank when ``scorer`` is None)."""
    run: dict[str, dict[str, float]] = {}
    qrels: dict[str, dict[str, int]] = {}
    for key, entry in sets.items():
        docs = [texts[d] for d in entry.candidates if d in texts]
        if scorer is None:
            scores = [-float(entry.candidates[d.doc_id] or 10**6) for d in docs]
        else:
            scores = scorer(entry.query, docs)
        run[key] = {d.doc_id: s for d, s in zip(docs, scores, strict=True)}
        qrels[key] = entry.qrels()
    if not qrels:
        raise InsufficientFeedback("no held-out query has a document labelled relevant")
    result = evaluate_run(run, qrels, ndcg_cutoffs=(10,), recall_cutoffs=(), mrr_cutoffs=())
    per_query = {k: round(v[METRIC], 6) for k, v in result.per_query.items()}
    return round(result.mean[METRIC], 6), per_query


def held_out_p_value(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """One-sided p of "after is better" over the held-out queries (1.0 for fewer than 2)."""
    keys = sorted(before)
    if len(keys) < 2:
        return 1.0
    return paired_randomization([after[k] for k in keys], [before[k] for k in keys]).p_value


def should_publish(
    before: float, after: float, min_gain: float = 0.0, p_value: float = 0.0, max_p: float = 1.0
) -> bool:
    """Publish only a strictly better model, and only on evidence: a tie, a drop or a gain
    the held-out queries do not support (``p_value > max_p``) keeps the serving version."""
    return after > before + min_gain and p_value <= max_p


def replay_examples(
    settings: Settings, version: str | None, count: int, seed: int
) -> list[RankingExample]:
    """``count`` examples (or all there are) drawn from those ``version`` was trained on."""
    pool = read_examples(settings, version) if version and count > 0 else []
    return random.Random(seed).sample(pool, min(count, len(pool)))


def _current_model(settings: Settings, version: str | None) -> TrainedCrossEncoder | None:
    family = cross_encoder_family(settings)
    if version is None:
        return None
    manifest = family.read_manifest(version)
    return load_cross_encoder(
        family.versions_dir / version / MODEL_DIR,
        max_length=int(manifest.get("max_length", 256)),
        device=resolve_device(settings.device),
        version=version,
    )


def _scorer(model: TrainedCrossEncoder | None) -> Scorer | None:
    if model is None:
        return None
    return lambda query, docs: model.score(query, list(docs))


def run_offline_update(
    settings: Settings,
    rows: Sequence[Mapping[str, Any]],
    texts: TextSource,
    config: OfflineUpdateConfig | None = None,
    *,
    rewrite: Rewrite | None = None,
    job_id: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train, compare on held-out queries, publish iff better; returns the job result:
    ``published``, ``before``/``after`` (nDCG@10 and the model each figure is of), example
    counts, and the new version when one was published."""
    config = config or OfflineUpdateConfig()
    started = time.perf_counter()
    labels = [r for r in rows if r.get("type") == "rel_label"]
    positives = positive_labels(labels)
    if len(positives) < config.min_examples:
        raise InsufficientFeedback(
            f"{len(positives)} positive relevance labels with hard negatives in the feedback; "
            f"the offline update needs at least min_examples={config.min_examples}"
        )
    train_keys, held_keys = split_queries(
        [query_key(str(r["query"])) for r in labels], config.eval_fraction, config.seed
    )
    by_collection: dict[str, set[str]] = {}
    for row in labels:
        wanted = by_collection.setdefault(str(row.get("collection") or "wiki"), set())
        wanted.add(str(row["doc_id"]))
        wanted.update(str(d) for d in row.get("hard_negatives") or [])
    documents: dict[str, TextDoc] = {}
    for collection, ids in by_collection.items():
        documents.update(texts(collection, sorted(ids)))
    examples = training_examples(labels, train_keys, documents)
    if len(examples) < 1:
        raise InsufficientFeedback(
            "no training query has a positive label with a negative whose text was found"
        )
    examples = with_rewrites(examples, config.queries, rewrite)
    held = held_out_sets(labels, held_keys)
    if progress is not None:
        progress(0, config.train.steps, "evaluate-before")

    family = cross_encoder_family(settings)
    parent = family.current_version()
    before, before_per_query = evaluate_held_out(
        _scorer(_current_model(settings, parent)), held, documents
    )
    init_dir = family.versions_dir / parent / MODEL_DIR if parent else None
    replayed = replay_examples(settings, parent, round(config.replay * len(examples)), config.seed)
    train_config = config.train
    most_negatives = max(len(e.negatives) for e in [*examples, *replayed])
    if train_config.negatives_per_query > most_negatives:
        train_config = replace(train_config, negatives_per_query=most_negatives)
    trained = train_cross_encoder(
        [*examples, *replayed],
        train_config,
        init_dir=init_dir,
        device=resolve_device(settings.device),
        progress=progress,
    )
    after, after_per_query = evaluate_held_out(_scorer(trained), held, documents)

    now_serving = family.current_version()
    if now_serving != parent:
        # Another version went live while this one trained: compare against that one.
        parent = now_serving
        before, before_per_query = evaluate_held_out(
            _scorer(_current_model(settings, parent)), held, documents
        )
    p_value = round(held_out_p_value(before_per_query, after_per_query), 6)
    published = should_publish(before, after, config.min_gain, p_value, config.max_p)
    sources: dict[str, int] = {}
    for row in labels:
        sources[str(row["source"])] = sources.get(str(row["source"]), 0) + 1
    result: dict[str, Any] = {
        "component": "reranker",
        "published": published,
        "outcome": "published" if published else "rejected",
        "reason": (
            f"held-out {METRIC} {before:.4f} -> {after:.4f} (p = {p_value:.3g}): "
            + (
                "better, published"
                if published
                else (
                    "not better"
                    if after <= before + config.min_gain
                    else f"not significant at max_p = {config.max_p}"
                )
                + ", the serving model stays"
            )
        ),
        "metric": METRIC,
        "p_value": p_value,
        "gate": {"min_gain": config.min_gain, "max_p": config.max_p},
        "before": {
            METRIC: before,
            "model": f"cross-encoder:{parent}" if parent else "first-stage-order",
            "per_query": before_per_query,
        },
        "after": {METRIC: after, "per_query": after_per_query},
        "examples": {
            "rel_labels": len(labels),
            "positive_labels": len(positives),
            "by_source": sources,
            "train_examples": len(examples),
            "replayed": len(replayed),
            "queries": config.queries,
            "train_queries": len(train_keys),
            "held_out_queries": len(held),
        },
        "parent_version": parent,
        "version": None,
        "train": asdict(train_config),
        "job_id": job_id,
    }
    if published:
        manifest = publish_cross_encoder(
            settings,
            trained,
            {
                "trained_on": "feedback",
                "offline_update": {k: v for k, v in result.items() if k != "version"},
            },
        )
        result["version"] = manifest["version"]
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


class PublishedScorer:
    """The published cross-encoder in process, as the shadow agent's relevance scorer
    (``services.orchestrator.shadow.RelevanceScorer``); follows ``CURRENT`` as it moves."""

    def __init__(self, settings: Settings) -> None:
        self.current = CurrentCrossEncoder(settings)

    @property
    def model_id(self) -> str:
        return self.current.get().model_id

    def score(self, query: str, docs: Sequence[Any]) -> list[float]:
        model = self.current.get()
        return model.score(query, [TextDoc(d.doc_id, d.title, d.text) for d in docs])


def published_scorer(settings: Settings) -> PublishedScorer | None:
    """The in-process scorer, or None when no cross-encoder is published."""
    scorer = PublishedScorer(settings)
    return scorer if scorer.current.trained else None
