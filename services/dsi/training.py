"""Multi-task DSI training (indexing + retrieval examples) with optional SAM, and evaluation by
trie-constrained beam search."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.dsi.docids import Docid, Trie
from services.dsi.model import DsiModel, lr_for_step
from services.dsi.sam import SAM


@dataclass(frozen=True)
class Example:
    """One training pair: ``text`` (a document prefix or a query) -> ``docid``."""

    text: str
    docid: Docid
    task: str  # "index" | "query" | "pseudo"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    sam_rho: float | None = None
    doc_tokens: int = 32
    query_tokens: int = 32
    seed: int = 0
    weight_decay: float = 0.01


@dataclass
class TrainStats:
    """What a training run spent: ``updates`` optimiser steps, ``passes`` forward/backward passes
    (SAM takes two per update), the mean loss per epoch, and the wall time."""

    updates: int = 0
    passes: int = 0
    examples_seen: int = 0
    seconds: float = 0.0
    epoch_loss: list[float] = field(default_factory=list)


Progress = Callable[[int, int, float], None]


def train(
    model: DsiModel,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainStats:
    """Shuffle and train for ``config.epochs`` epochs; ``progress(epoch, epochs, loss)`` after each.

    ``start_epoch`` skips epochs already done (a resumed job); ``on_epoch_end`` lets the caller
    checkpoint. Inputs are truncated per task: documents to ``doc_tokens`` (DSI's L), queries to
    ``query_tokens``.
    """
    stats = TrainStats()
    if not examples:
        return stats
    started = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sam = SAM(base, config.sam_rho) if config.sam_rho else None
    rng = random.Random(config.seed + start_epoch)
    order = list(range(len(examples)))
    step = 0
    model.train(True)
    for epoch in range(start_epoch, config.epochs):
        rng.shuffle(order)
        total = 0.0
        batches = 0
        for start in range(0, len(order), config.batch_size):
            chunk = [examples[i] for i in order[start : start + config.batch_size]]
            for group in base.param_groups:
                group["lr"] = lr_for_step(step, config.lr, config.warmup_steps)

            def batch_loss(chunk: list[Example] = chunk) -> torch.Tensor:
                # Indexing and query examples share a batch; each is cut to its own length.
                docs = [e for e in chunk if e.task == "index"]
                queries = [e for e in chunk if e.task != "index"]
                losses = []
                if docs:
                    loss = model.loss(
                        [e.text for e in docs], [e.docid for e in docs], config.doc_tokens
                    )
                    losses.append(loss * len(docs))
                if queries:
                    loss = model.loss(
                        [e.text for e in queries], [e.docid for e in queries], config.query_tokens
                    )
                    losses.append(loss * len(queries))
                return torch.stack(losses).sum() / len(chunk)

            if sam is not None:
                loss = sam.step(batch_loss)
                stats.passes += 2
            else:
                base.zero_grad(set_to_none=True)
                loss = batch_loss()
                loss.backward()  # type: ignore[no-untyped-call]
                base.step()
                stats.passes += 1
            stats.updates += 1
            stats.examples_seen += len(chunk)
            total += float(loss.detach())
            batches += 1
            step += 1
        stats.epoch_loss.append(total / max(1, batches))
        if on_epoch_end is not None:  # checkpoint first: progress reporting may fail
            on_epoch_end(epoch + 1)
        if progress is not None:
            progress(epoch + 1, config.epochs, stats.epoch_loss[-1])
    model.train(False)
    stats.seconds = time.perf_counter() - started
    return stats


def rank_docids(
    model: DsiModel,
    texts: Sequence[str],
    trie: Trie,
    *,
    beam: int,
    max_tokens: int,
    max_steps: int,
    batch_size: int = 64,
    to_docid: Callable[[list[int]], Docid],
) -> list[list[tuple[Docid, float]]]:
    """Ranked docids (best first, at most ``beam``) for each text, by constrained beam search."""
    ranked: list[list[tuple[Docid, float]]] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        for beams in model.beam_search(chunk, trie, beam, max_tokens, max_steps):
            ranked.append([(to_docid(tokens), score) for tokens, score in beams])
    return ranked
