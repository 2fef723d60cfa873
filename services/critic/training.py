"""Critic training data and training (SIM-RAG §3.2): label, balance, split by question, fine-tune.

- Labels: each self-practice turn is 1 (accept) when its answer matches a gold answer, by exact
  match (the paper) or, as a documented alternative for a small reasoner, by answer accuracy.
- Balancing: the majority label is down-sampled to the size of the minority one.
- Split: 80/20 by question id (no question on both sides), stratified by each question's most
  common label, so dev measures the critic on questions it never saw.

The trained classifier is published as a new version of the ``critic`` family together with its
held-out figures, compared with the reasoner's own self-assessment (accept unless it said
"unsure") on the same rows.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from services.critic.engine import (
    BODY_DIR,
    DEFAULT_THRESHOLD,
    HEAD_FILE,
    MAX_INPUT_TOKENS,
    build_classifier,
    critic_family,
    encode_batch,
    load_tokenizer,
)
from services.critic.practice import PracticeRow, load_current_trajectories
from shared.models import EMBEDDER_ID
from shared.settings import Settings

Label = Literal["em", "acc"]
Progress = Callable[[int, int, str], None]
SPLIT_FILE = "split.json"


def verdict(row: PracticeRow, label: Label) -> int:
    return row.em if label == "em" else row.acc


def balance_by_downsampling(
    rows: Sequence[PracticeRow], label: Label, seed: int = 42
) -> list[PracticeRow]:
    """Keep every row of the minority label and an equal random sample of the majority one
    (the paper down-samples the rejects). Order is preserved. No minority rows: nothing kept."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[verdict(row, label)].append(index)
    size = min(len(by_label[0]), len(by_label[1]))
    rng = random.Random(seed)
    kept = sorted(rng.sample(by_label[0], size) + rng.sample(by_label[1], size))
    return [rows[i] for i in kept]


def split_by_question(
    rows: Sequence[PracticeRow], label: Label, dev_fraction: float = 0.2, seed: int = 42
) -> tuple[list[PracticeRow], list[PracticeRow]]:
    """``(train, dev)`` with every question's rows on one side only; questions are stratified
    by their most common label (ties count as accept) so both sides see both kinds."""
    labels_by_question: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        labels_by_question[row.qid].append(verdict(row, label))
    strata: dict[int, list[str]] = defaultdict(list)
    for qid, labels in labels_by_question.items():
        counts = Counter(labels)
        strata[int(counts[1] >= counts[0])].append(qid)
    rng = random.Random(seed)
    dev_questions: set[str] = set()
    for mode in sorted(strata):
        qids = sorted(strata[mode])
        rng.shuffle(qids)
        take = round(len(qids) * dev_fraction)
        if len(qids) > 1:
            take = min(max(take, 1), len(qids) - 1)
        dev_questions.update(qids[:take])
    train = [row for row in rows if row.qid not in dev_questions]
    dev = [row for row in rows if row.qid in dev_questions]
    return train, dev


def binary_report(predicted: Sequence[bool], gold: Sequence[int]) -> dict[str, float | int]:
    """Accuracy, and precision / recall / F1 of "accept", of a yes/no decision."""
    tp = sum(1 for p, g in zip(predicted, gold, strict=True) if p and g)
    fp = sum(1 for p, g in zip(predicted, gold, strict=True) if p and not g)
    fn = sum(1 for p, g in zip(predicted, gold, strict=True) if not p and g)
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = sum(1 for p, g in zip(predicted, gold, strict=True) if bool(p) == bool(g))
    return {
        "n": n,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accept_rate": round(sum(bool(p) for p in predicted) / n, 4) if n else 0.0,
    }


def rows_as_inputs(rows: Sequence[PracticeRow]) -> list[tuple[str, str, str, str]]:
    return [(r.question, r.context, r.answer, r.rationale) for r in rows]


def compare_with_self_assessment(
    p_accept: Sequence[float], rows: Sequence[PracticeRow], label: Label, threshold: float
) -> dict[str, Any]:
    gold = [verdict(r, label) for r in rows]
    return {
        "critic": binary_report([p >= threshold for p in p_accept], gold),
        "self_assessment": binary_report([not r.self_unsure for r in rows], gold),
        "always_accept": binary_report([True] * len(rows), gold),
        "positive_rate": round(sum(gold) / len(gold), 4) if gold else 0.0,
    }


@dataclass(frozen=True)
class TrainConfig:
    label: Label = "em"
    epochs: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    batch_size: int = 8
    warmup_fraction: float = 0.1
    max_input_tokens: int = MAX_INPUT_TOKENS
    dev_fraction: float = 0.2
    seed: int = 42


def fit(
    rows: Sequence[PracticeRow], config: TrainConfig, progress: Progress | None = None
) -> tuple[Any, Any, list[float]]:
    """Fine-tune a fresh classifier (body and head) on ``rows``; returns it, its tokenizer and
    the mean training loss of each epoch."""
    import torch

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer()
    model = build_classifier()
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, -(-len(rows) // config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * config.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup + 1))
        ),
    )
    rng = random.Random(config.seed)
    order = list(range(len(rows)))
    losses = []
    step = 0
    for _ in range(config.epochs):
        rng.shuffle(order)
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            batch_rows = [rows[i] for i in order[start : start + config.batch_size]]
            batch = encode_batch(tokenizer, rows_as_inputs(batch_rows), config.max_input_tokens)
            labels = torch.tensor([verdict(r, config.label) for r in batch_rows])
            loss = torch.nn.functional.cross_entropy(model(**batch), labels)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * len(batch_rows)
            step += 1
            if progress is not None:
                progress(step, total_steps, "train")
        losses.append(round(epoch_loss / len(rows), 4))
    model.eval()
    return model, tokenizer, losses


def predict(
    model: Any, tokenizer: Any, rows: Sequence[PracticeRow], max_tokens: int
) -> list[float]:
    import torch

    out: list[float] = []
    for start in range(0, len(rows), 16):
        batch = encode_batch(tokenizer, rows_as_inputs(rows[start : start + 16]), max_tokens)
        with torch.inference_mode():
            out.extend(torch.softmax(model(**batch), dim=-1)[:, 1].tolist())
    return out


def train_critic(
    settings: Settings,
    config: TrainConfig,
    *,
    rows: Sequence[PracticeRow] | None = None,
    practice_manifest: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Label, balance, split, train, evaluate on held-out questions, publish; returns the manifest.

    ``rows`` default to the current self-practice trajectories."""
    import torch

    if rows is None:
        rows, practice_manifest = load_current_trajectories(settings)
    started = time.perf_counter()
    balanced = balance_by_downsampling(rows, config.label, config.seed)
    if not balanced:
        raise ValueError(
            f"no self-practice turn is labelled accept by {config.label!r}: nothing to learn from "
            f"({len(rows)} turns); practise on more questions or label by 'acc'"
        )
    train_rows, dev_rows = split_by_question(
        balanced, config.label, config.dev_fraction, config.seed
    )
    dev_questions = {r.qid for r in dev_rows}
    model, tokenizer, losses = fit(train_rows, config, progress)
    # ``all_turns``: every turn of the held-out questions, unbalanced: the label mix the loop meets.
    all_dev = [r for r in rows if r.qid in dev_questions]
    held_out: dict[str, Any] = {}
    for name, dev in (("balanced", dev_rows), ("all_turns", all_dev)):
        if dev:
            held_out[name] = compare_with_self_assessment(
                predict(model, tokenizer, dev, config.max_input_tokens),
                dev,
                config.label,
                DEFAULT_THRESHOLD,
            )
    label_counts = {
        rule: {"accept": sum(r.em if rule == "em" else r.acc for r in rows), "turns": len(rows)}
        for rule in ("em", "acc")
    }
    manifest: dict[str, Any] = {
        "kind": "critic",
        "base_model": EMBEDDER_ID,
        "architecture": "MiniLM-L6 body, mean pooling, linear head over {reject, accept}",
        "threshold": DEFAULT_THRESHOLD,
        "max_input_tokens": config.max_input_tokens,
        "config": asdict(config),
        "practice_version": (practice_manifest or {}).get("version"),
        "practice_dataset": (practice_manifest or {}).get("dataset"),
        "label_counts": label_counts,
        "examples": {
            "balanced": len(balanced),
            "train": len(train_rows),
            "dev": len(dev_rows),
            "train_questions": len({r.qid for r in train_rows}),
            "dev_questions": len(dev_questions),
        },
        "train_loss_per_epoch": losses,
        "held_out": held_out,
    }
    family = critic_family(settings)
    with family.lock(), family.build(manifest) as scratch:
        model.body.save_pretrained(scratch / BODY_DIR)
        tokenizer.save_pretrained(scratch / BODY_DIR)
        torch.save(model.head.state_dict(), scratch / HEAD_FILE)
        (scratch / SPLIT_FILE).write_text(
            json.dumps({"dev_questions": sorted(dev_questions)}, indent=0)
        )
        manifest["seconds"] = round(time.perf_counter() - started, 1)
    if progress is not None:
        progress(1, 1, "published")
    return family.read_manifest()
