"""The cross-encoder CAR trains (and NExT-Search's offline update retrains), and how it is served.

No pretrained cross-encoder ships offline here, so the ranker is sentence-transformers'
``CrossEncoder`` built from all-MiniLM-L6-v2's BERT body (the platform's embedder weights) with
a fresh one-logit head, fine-tuned on (query, positive, hard negatives) examples:

- ``pointwise``: binary cross-entropy on every (query, document) pair, positives 1, negatives 0;
- ``listwise``: softmax cross-entropy over one positive and its negatives per query (the
  "localised contrastive estimation" loss of Gao et al. 2021), which ranks rather than classifies.

Training runs a fixed number of *steps* (``batch_size`` queries each, cycling through the
examples), so two training sets of different sizes can be compared at equal cost, as CAR's
ablations require. Every example carries a ``source`` (``original``, ``car``, ``query-only``,
``synthetic``, ``feedback``) so a report can always tell what a model was trained on.

Versions are an ``ArtifactFamily`` under ``<data_dir>/models/cross-encoder``; the reranker
serves ``CURRENT`` and loads a newly published version on its next request (no restart).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.reranker.icr import document_text
from shared.artifacts import ArtifactFamily
from shared.errors import ErrorCode, LodestarError
from shared.models import EMBEDDER_ID, embedder_path, resolve_device
from shared.settings import Settings

MODEL_DIR = "model"
#: The training examples beside a published model (JSON lines, texts included, so a replay
#: needs neither the dataset nor the collection they came from).
EXAMPLES_FILE = "train_examples.jsonl"
MAX_STORED_EXAMPLES = 4000
#: Tokens of one (query, document) input; SciFact abstracts run to ~300 tokens, and 256 keeps
#: the query whole and the abstract's opening, where claims are usually decided.
DEFAULT_MAX_LENGTH = 256
Loss = Literal["pointwise", "listwise"]
Progress = Callable[[int, int, str], None]


def cross_encoder_family(settings: Settings) -> ArtifactFamily:
    return ArtifactFamily(settings.data_dir / "models" / "cross-encoder")


@dataclass(frozen=True)
class TextDoc:
    doc_id: str
    title: str
    text: str

    def as_text(self) -> str:
        return document_text(self.title, self.text)


@dataclass(frozen=True)
class RankingExample:
    """One training query with its relevant document and hard negatives."""

    qid: str
    query: str
    positive: TextDoc
    negatives: tuple[TextDoc, ...]
    source: str = "original"
    weight: float = 1.0


@dataclass(frozen=True)
class CrossEncoderTrainConfig:
    steps: int = 300
    batch_size: int = 8
    """Queries per step; each brings its positive and ``negatives_per_query`` negatives."""
    negatives_per_query: int = 3
    loss: Loss = "pointwise"
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 42

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.negatives_per_query < 1:
            raise ValueError("steps, batch_size and negatives_per_query must be at least 1")
        if self.loss not in ("pointwise", "listwise"):
            raise ValueError(f"unknown loss {self.loss!r}; expected pointwise or listwise")


class LeakageError(ValueError):
    """A training example touches a test query or a test-judged document."""


def check_no_leakage(
    examples: Iterable[RankingExample],
    *,
    forbidden_qids: AbstractSet[str] = frozenset(),
    forbidden_doc_ids: AbstractSet[str] = frozenset(),
) -> None:
    """Refuse training data that contains a test query or any document judged for one: the
    positive, a negative, or (for rewrites) the document the rewrite was written from."""
    for example in examples:
        if example.qid in forbidden_qids:
            raise LeakageError(f"training example {example.qid!r} is a test query")
        for doc in (example.positive, *example.negatives):
            if doc.doc_id in forbidden_doc_ids:
                raise LeakageError(
                    f"training example {example.qid!r} uses test-judged document {doc.doc_id!r}"
                )


def mine_hard_negatives(
    ranking: Sequence[str], relevant: Iterable[str], count: int, *, skip: int = 0
) -> list[str]:
    """The first ``count`` documents of a first-stage ranking that are not judged relevant,
    after skipping the top ``skip`` non-relevant ones (the very top of a ranking holds most of
    the unjudged relevant documents, i.e. false negatives)."""
    judged = set(relevant)
    negatives = [doc_id for doc_id in ranking if doc_id not in judged]
    return negatives[skip : skip + count]


class TrainedCrossEncoder:
    """A ``CrossEncoder`` with its tokenizer, scoring (query, document) pairs by raw logit."""

    def __init__(self, model: Any, max_length: int, *, version: str | None = None) -> None:
        self.model = model  # sentence_transformers.CrossEncoder
        self.max_length = max_length
        self.version = version
        self.losses: list[float] = []
        self.examples: tuple[RankingExample, ...] = ()
        """What it was trained on: published beside the model, so a later offline update can
        replay it (rehearsal against forgetting)."""
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return f"cross-encoder:{self.version}" if self.version else "cross-encoder"

    def _encode(self, queries: Sequence[str], texts: Sequence[str]) -> Any:
        batch = self.model.tokenizer(
            list(queries),
            list(texts),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch.to(self.model.model.device)

    def logits(self, queries: Sequence[str], texts: Sequence[str]) -> Any:
        """Raw scores as a 1-d tensor, with gradients (training)."""
        return self.model.model(**self._encode(queries, texts)).logits.squeeze(-1)

    def score(
        self, query: str, documents: Sequence[TextDoc | str], *, batch_size: int = 32
    ) -> list[float]:
        """One relevance logit per document (higher first); order-independent."""
        import torch

        texts = [d if isinstance(d, str) else d.as_text() for d in documents]
        out: list[float] = []
        with self._lock, torch.inference_mode():
            self.model.model.eval()
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                out.extend(float(v) for v in self.logits([query] * len(chunk), chunk).tolist())
        return out

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))


def load_cross_encoder(
    directory: Path | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "cpu",
    version: str | None = None,
) -> TrainedCrossEncoder:
    """A saved cross-encoder, or (``directory=None``) a fresh one over the MiniLM body."""
    import transformers
    from sentence_transformers import CrossEncoder

    # The fresh head is reported as "newly initialised" at warning level on every load.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        source = embedder_path() if directory is None else directory
        model = CrossEncoder(str(source), num_labels=1, max_length=max_length, device=device)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return TrainedCrossEncoder(model, max_length, version=version)


def _step_pairs(
    batch: Sequence[RankingExample], negatives_per_query: int, rng: random.Random
) -> tuple[list[str], list[str], list[float], list[float]]:
    """Flattened (query, text, label, weight) for one step: per query its positive first, then
    ``negatives_per_query`` negatives sampled from its pool (with replacement when short)."""
    queries: list[str] = []
    texts: list[str] = []
    labels: list[float] = []
    weights: list[float] = []
    for example in batch:
        pool = list(example.negatives)
        if len(pool) >= negatives_per_query:
            chosen = rng.sample(pool, negatives_per_query)
        else:
            chosen = [rng.choice(pool) for _ in range(negatives_per_query)]
        for doc, label in [(example.positive, 1.0)] + [(d, 0.0) for d in chosen]:
            queries.append(example.query)
            texts.append(doc.as_text())
            labels.append(label)
            weights.append(example.weight)
    return queries, texts, labels, weights


def train_cross_encoder(
    examples: Sequence[RankingExample],
    config: CrossEncoderTrainConfig,
    *,
    init_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> TrainedCrossEncoder:
    """Fine-tune for ``config.steps`` steps, from ``init_dir`` (a published version's model, to
    continue training) or from the MiniLM body. Examples without negatives are skipped."""
    import torch

    usable = [e for e in examples if e.negatives]
    if not usable:
        raise ValueError("no training example has a negative: nothing to contrast")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    trained = load_cross_encoder(init_dir, max_length=config.max_length, device=device)
    network = trained.model.model
    network.train()
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(1, int(config.steps * config.warmup_fraction))
    total = config.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup + 1))),
    )
    group = 1 + config.negatives_per_query
    order: list[int] = []
    losses: list[float] = []
    for step in range(1, total + 1):
        batch: list[RankingExample] = []
        while len(batch) < min(config.batch_size, len(usable)):
            if not order:
                order = list(range(len(usable)))
                rng.shuffle(order)
            batch.append(usable[order.pop()])
        queries, texts, labels, weights = _step_pairs(batch, config.negatives_per_query, rng)
        logits = trained.logits(queries, texts)
        weight = torch.tensor(weights)
        if config.loss == "pointwise":
            per_pair = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.tensor(labels), reduction="none"
            )
            loss = (per_pair * weight).sum() / weight.sum()
        else:
            grouped = logits.view(-1, group)  # the positive is column 0 of every row
            per_query = torch.nn.functional.cross_entropy(
                grouped, torch.zeros(len(grouped), dtype=torch.long), reduction="none"
            )
            query_weight = weight.view(-1, group)[:, 0]
            loss = (per_query * query_weight).sum() / query_weight.sum()
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, total, "train")
    network.eval()
    trained.losses = losses
    trained.examples = tuple(usable)
    return trained


def loss_summary(losses: Sequence[float], windows: int = 10) -> list[float]:
    """Mean loss over ``windows`` equal slices of training, for manifests and reports."""
    if not losses:
        return []
    size = max(1, len(losses) // windows)
    return [
        round(sum(losses[i : i + size]) / len(losses[i : i + size]), 4)
        for i in range(0, len(losses), size)
    ]


def publish_cross_encoder(
    settings: Settings, trained: TrainedCrossEncoder, manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """Publish ``trained`` as the family's new ``CURRENT`` (atomically); returns its manifest."""
    family = cross_encoder_family(settings)
    full = {
        "kind": "cross-encoder",
        "base_model": EMBEDDER_ID,
        "architecture": "MiniLM-L6 BERT body + one-logit head (sentence-transformers CrossEncoder)",
        "max_length": trained.max_length,
        "train_loss": loss_summary(trained.losses),
        **manifest,
    }
    kept = _replay_sample(trained.examples)
    if kept:
        full["replay_examples"] = len(kept)
    with family.lock(), family.build(full) as scratch:
        trained.save(scratch / MODEL_DIR)
        if kept:
            write_examples(scratch / EXAMPLES_FILE, kept)
    published = family.read_manifest()
    trained.version = str(published["version"])
    return published


def _replay_sample(examples: Sequence[RankingExample]) -> list[RankingExample]:
    """At most ``MAX_STORED_EXAMPLES`` of them (a seeded sample), so that a chain of offline
    updates, each storing what it replayed plus its own feedback, stays bounded."""
    if len(examples) <= MAX_STORED_EXAMPLES:
        return list(examples)
    return random.Random(0).sample(list(examples), MAX_STORED_EXAMPLES)


def write_examples(path: Path, examples: Sequence[RankingExample]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for e in examples:
            row = {
                "qid": e.qid,
                "query": e.query,
                "positive": asdict(e.positive),
                "negatives": [asdict(d) for d in e.negatives],
                "source": e.source,
                "weight": e.weight,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_examples(settings: Settings, version: str) -> list[RankingExample]:
    """The training examples published with ``version`` (none for a version published before
    they were kept, or with none to keep)."""
    path = cross_encoder_family(settings).versions_dir / version / EXAMPLES_FILE
    if not path.exists():
        return []
    examples: list[RankingExample] = []
    with path.open(encoding="utf-8") as rows:
        for line in rows:
            row = json.loads(line)
            examples.append(
                RankingExample(
                    qid=str(row["qid"]),
                    query=str(row["query"]),
                    positive=TextDoc(**row["positive"]),
                    negatives=tuple(TextDoc(**d) for d in row["negatives"]),
                    source=str(row["source"]),
                    weight=float(row["weight"]),
                )
            )
    return examples


class CrossEncoderNotTrained(LodestarError):
    def __init__(self, root: Path) -> None:
        super().__init__(
            ErrorCode.unavailable,
            f"no cross-encoder is published under {root.name}; train one with "
            "`lodestar experiment car --publish` or the offline-update job first",
            retry_after_s=60,
        )


class CurrentCrossEncoder:
    """The family's ``CURRENT`` version, loaded once and reloaded when ``CURRENT`` moves."""

    def __init__(self, settings: Settings) -> None:
        self.family = cross_encoder_family(settings)
        self.device = resolve_device(settings.device)
        self._loaded: TrainedCrossEncoder | None = None
        self._lock = threading.Lock()

    @property
    def trained(self) -> bool:
        return self.family.current_version() is not None

    def get(self) -> TrainedCrossEncoder:
        version = self.family.current_version()
        if version is None:
            raise CrossEncoderNotTrained(self.family.root)
        with self._lock:
            if self._loaded is None or self._loaded.version != version:
                manifest = self.family.read_manifest(version)
                self._loaded = load_cross_encoder(
                    self.family.loadable(version) / MODEL_DIR,
                    max_length=int(manifest.get("max_length", DEFAULT_MAX_LENGTH)),
                    device=self.device,
                    version=version,
                )
            return self._loaded


@dataclass
class TrainingReport:
    """What a training run used, for a manifest."""

    config: dict[str, Any]
    examples: int
    sources: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def of(
        cls, examples: Sequence[RankingExample], config: CrossEncoderTrainConfig, started: float
    ) -> TrainingReport:
        sources: dict[str, int] = {}
        for example in examples:
            sources[example.source] = sources.get(example.source, 0) + 1
        return cls(asdict(config), len(examples), sources, round(time.perf_counter() - started, 1))
