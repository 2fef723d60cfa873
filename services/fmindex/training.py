"""Fine-tuning SmolLM2-135M as SEAL's n-gram generator.

Training pairs follow SEAL's ``scripts/training`` recipe, adapted to a causal LM (source and
target are one sequence; the loss covers the target tokens only):

- *supervised* (a query and a passage judged relevant to it):
  ``query || body`` → 10-token spans of the passage, 10 samples per pair, drawn with weights
  ``exp(overlap / temperature)`` where ``overlap`` counts span tokens that also occur in the query
  (SEAL favours spans overlapping the query); ``query || title`` → ``title <TITLE_EOS>``, 3 samples;
- *unsupervised* (passages without a real query): a pseudo-query (a random sentence of the
  passage) → 3 random 10-token spans of the rest of the passage and 1 title.

Targets are token ids cut from the same tokenisation the FM-index stores (leading spaces and all),
so what the model learns to emit is exactly what the index can match.

The model is published as a version of the ``fmindex-generator`` artefact family (build aside,
atomic ``CURRENT``), with the training manifest (data counts, steps, loss curve, wall time).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.fmindex.corpus import BODY_MARKER, TITLE_MARKER, Markers, encode_text
from shared.artifacts import ArtifactFamily
from shared.schemas import Document

GENERATOR_FAMILY = "fmindex-generator"
SPAN_LENGTH = 10

Progress = Callable[[int, int, str, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainingExample:
    source: str
    """Query text followed by its marker (``" || body"`` or ``" || title"``)."""
    target: tuple[int, ...]
    kind: str
    """``body``, ``title``, ``pseudo-body`` or ``pseudo-title``."""


@dataclass
class PairConfig:
    body_samples: int = 10
    title_samples: int = 3
    pseudo_body_samples: int = 3
    pseudo_title_samples: int = 1
    span_length: int = SPAN_LENGTH
    temperature: float = 1.0
    seed: int = 0


def _normalised(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [t.lstrip("Ġ▁ ").lower() for t in tokenizer.convert_ids_to_tokens(list(ids))]


def sample_spans(
    body: Sequence[int],
    overlap_flags: Sequence[bool],
    n: int,
    length: int,
    temperature: float,
    rng: random.Random,
) -> list[tuple[int, ...]]:
    """``n`` distinct spans of ``length`` tokens, weighted by ``exp(overlap / temperature)``."""
    if len(body) <= length:
        return [tuple(body)] if body else []
    starts = list(range(len(body) - length + 1))
    prefix = [0]
    for flag in overlap_flags:
        prefix.append(prefix[-1] + int(flag))
    weights = [math.exp((prefix[s + length] - prefix[s]) / temperature) for s in starts]
    chosen: list[tuple[int, ...]] = []
    for _ in range(min(n, len(starts))):
        (pick,) = rng.choices(range(len(starts)), weights=weights)
        chosen.append(tuple(body[starts[pick] : starts[pick] + length]))
        weights[pick] = 0.0
        if sum(weights) <= 0:
            break
    return chosen


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def build_pairs(
    tokenizer: Any,
    corpus: Sequence[Document],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    config: PairConfig | None = None,
) -> list[TrainingExample]:
    """SEAL's supervised pairs for the judged queries, unsupervised ones for the other passages."""
    config = config or PairConfig()
    rng = random.Random(config.seed)
    markers = Markers(tokenizer)
    by_id = {doc.id: doc for doc in corpus}
    examples: list[TrainingExample] = []
    judged_docs: set[str] = set()
    stop = {"the", "a", "an", "of", "in", "and", "to", "is", "are", "for", "with", "on", "by"}
    for qid, judgements in qrels.items():
        query = queries[qid]
        query_words = {w for w in _normalised(tokenizer, encode_text(tokenizer, query))} - stop
        for doc_id, relevance in judgements.items():
            if relevance <= 0 or doc_id not in by_id:
                continue
            doc = by_id[doc_id]
            judged_docs.add(doc_id)
            body = encode_text(tokenizer, doc.text)
            flags = [w in query_words for w in _normalised(tokenizer, body)]
            for span in sample_spans(
                body, flags, config.body_samples, config.span_length, config.temperature, rng
            ):
                examples.append(TrainingExample(query + BODY_MARKER, span, "body"))
            title = (*tuple(encode_text(tokenizer, doc.title)), markers.title_eos)
            for _ in range(config.title_samples if doc.title.strip() else 0):
                examples.append(TrainingExample(query + TITLE_MARKER, title, "title"))
    for doc in corpus:
        if doc.id in judged_docs:
            continue
        sentences = [s for s in _SENTENCE.split(" ".join(doc.text.split())) if len(s) > 20]
        if not sentences:
            continue
        pseudo = rng.choice(sentences)
        rest = " ".join(s for s in sentences if s is not pseudo) or pseudo
        body = encode_text(tokenizer, rest)
        for span in sample_spans(
            body,
            [False] * len(body),
            config.pseudo_body_samples,
            config.span_length,
            config.temperature,
            rng,
        ):
            examples.append(TrainingExample(pseudo + BODY_MARKER, span, "pseudo-body"))
        if doc.title.strip():
            title = (*tuple(encode_text(tokenizer, doc.title)), markers.title_eos)
            for _ in range(config.pseudo_title_samples):
                examples.append(TrainingExample(pseudo + TITLE_MARKER, title, "pseudo-title"))
    return examples


@dataclass
class TrainConfig:
    max_steps: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_minutes: float = 25.0
    """Stop early (and still publish) once this wall-clock budget is spent."""
    supervised_fraction: float = 0.6
    """Share of each batch drawn from real-query pairs (the rest: pseudo-query pairs)."""
    max_source_tokens: int = 64
    threads: int = 2
    seed: int = 0


@dataclass
class TrainReport:
    version: str
    steps: int
    examples: dict[str, int]
    seconds: float
    seconds_per_step: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    stopped_by: str = "max_steps"


def _batch_tensors(
    tokenizer: Any, batch: Sequence[TrainingExample], max_source_tokens: int, pad_id: int
) -> tuple[Any, Any, Any]:
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    for example in batch:
        source = tokenizer(example.source, add_special_tokens=False).input_ids[-max_source_tokens:]
        ids = list(source) + list(example.target)
        labels = [-100] * len(source) + list(example.target)
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        # Right padding: positions stay 0..len-1 for every row, as at decoding time.
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels_t[i, : len(labels)] = torch.tensor(labels)
        attention[i, : len(ids)] = 1
    return input_ids, labels_t, attention


def train_generator(
    base_model_dir: Path,
    family_root: Path,
    examples: Sequence[TrainingExample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """Fine-tune the causal LM in ``base_model_dir`` on ``examples`` and publish it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or TrainConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer: Any = AutoTokenizer.from_pretrained(base_model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model.train()
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    supervised = [e for e in examples if not e.kind.startswith("pseudo")]
    pseudo = [e for e in examples if e.kind.startswith("pseudo")]
    if not supervised and not pseudo:
        raise ValueError("no training examples")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        remaining = max(1, config.max_steps - config.warmup_steps)
        return max(0.0, 1.0 - (step - config.warmup_steps) / remaining)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    n_supervised = (
        round(config.batch_size * config.supervised_fraction) if pseudo else config.batch_size
    )
    if not supervised:
        n_supervised = 0
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    window: list[float] = []
    stopped_by = "max_steps"
    step = 0
    for step in range(1, config.max_steps + 1):
        batch = rng.sample(supervised, min(n_supervised, len(supervised))) if supervised else []
        if pseudo:
            batch += rng.sample(pseudo, min(config.batch_size - len(batch), len(pseudo)))
        input_ids, labels, attention = _batch_tensors(
            tokenizer, batch, config.max_source_tokens, pad_id
        )
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.item()))
        if progress:
            progress(step, config.max_steps, "training", {"loss": round(window[-1], 4)})
        if step % 10 == 0 or step == config.max_steps:
            mean = sum(window) / len(window)
            curve.append((step, round(mean, 4)))
            window = []
        if (time.perf_counter() - started) / 60 >= config.max_minutes:
            stopped_by = "max_minutes"
            break
    seconds = time.perf_counter() - started
    if window:  # the last partial window (a time-capped run rarely ends on a multiple of 10)
        curve.append((step, round(sum(window) / len(window), 4)))
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.kind] = counts.get(example.kind, 0) + 1
    manifest = {
        "kind": GENERATOR_FAMILY,
        "base_model": str(base_model_dir),
        "config": asdict(config),
        "examples": counts,
        "steps": step,
        "stopped_by": stopped_by,
        "seconds": round(seconds, 1),
        "loss_curve": curve,
    }
    if progress:
        progress(step, config.max_steps, "publishing", {})
    family = ArtifactFamily(family_root)
    model.eval()
    with family.lock(), family.build(manifest) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return TrainReport(
        version=family.current_version() or "",
        steps=step,
        examples=counts,
        seconds=seconds,
        seconds_per_step=seconds / max(1, step),
        loss_curve=curve,
        stopped_by=stopped_by,
    )
