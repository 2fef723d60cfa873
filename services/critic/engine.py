"""The critic model: the MiniLM encoder body with a two-way head, over SIM-RAG's input layout.

SIM-RAG fine-tunes Flan-T5 to emit "1" (accept) or "0" (reject) for
``instruction + question and retrieved context + answer + rationale``. No pretrained seq2seq
model ships offline here, so the critic is all-MiniLM-L6-v2's BERT body (22M parameters, the
platform's embedder weights), mean-pooled, with a linear head over {reject, accept}; ``p_accept``
is the softmax probability of accept, the analogue of reading the probabilities of the tokens
"0" and "1". The text keeps the paper's layout; the context is what gets truncated, never the
answer or the rationale (they go in the second segment of a sentence pair).

Versions live in an ``ArtifactFamily`` under ``<data_dir>/models/critic``: the service serves
``CURRENT`` and picks up a newly published version on its next request.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.artifacts import ArtifactFamily
from shared.errors import ErrorCode, LodestarError
from shared.models import embedder_path, resolve_device
from shared.settings import Settings

CRITIC_INSTRUCTION = (
    "Instruction: Predict whether the following answer to the question, given the retrieved "
    "context, should be accepted (1) or rejected (0), based on its rationale."
)
#: Token budget of one critic input (MiniLM's position table allows 512).
MAX_INPUT_TOKENS = 384
HEAD_FILE = "head.pt"
BODY_DIR = "body"
#: Accept when p_accept reaches this (the classes are balanced in training).
DEFAULT_THRESHOLD = 0.5


def critic_family(settings: Settings) -> ArtifactFamily:
    return ArtifactFamily(settings.data_dir / "models" / "critic")


def critic_text(question: str, context: str) -> str:
    """The first segment: instruction, then the task content (question and retrieved context)."""
    task = f"Question: {question}"
    if context.strip():
        task += f"\n{context.strip()}"
    return f"{CRITIC_INSTRUCTION}\n{task}"


def critic_answer_text(answer: str, rationale: str) -> str:
    """The second segment, kept whole: the answer and the rationale it is judged by."""
    return f"Answer: {answer}\nRationale: {rationale}"


class CriticNotTrained(LodestarError):
    def __init__(self, root: Path) -> None:
        super().__init__(
            ErrorCode.unavailable,
            f"no critic model is published under {root}; run `lodestar critic practice` and "
            "`lodestar critic train` (or the critic jobs) first",
            retry_after_s=60,
        )


def build_classifier(body_dir: Path | None = None) -> Any:
    """A fresh classifier over the MiniLM body (from ``body_dir``, else the embedder weights)."""
    import torch
    from transformers import AutoModel

    class CriticClassifier(torch.nn.Module):
        def __init__(self, body: Any) -> None:
            super().__init__()
            self.body = body
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(int(body.config.hidden_size), 2)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.body(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            # Mean pooling over real tokens, as the sentence-transformers model was trained.
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(self.dropout(pooled))

    body = AutoModel.from_pretrained(str(body_dir or embedder_path()))
    return CriticClassifier(body)


def load_tokenizer(path: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or embedder_path()))


def encode_batch(
    tokenizer: Any, rows: list[tuple[str, str, str, str]], max_tokens: int = MAX_INPUT_TOKENS
) -> Any:
    """Tokenise ``(question, context, answer, rationale)`` rows; truncate the context only."""
    first = [critic_text(q, c) for q, c, _, _ in rows]
    second = [critic_answer_text(a, r) for _, _, a, r in rows]
    return tokenizer(
        first,
        second,
        truncation="only_first",
        max_length=max_tokens,
        padding=True,
        return_tensors="pt",
    )


@dataclass(frozen=True)
class Verdict:
    accept: bool
    p_accept: float
    model_version: str


class LoadedCritic:
    """One published critic version in memory."""

    def __init__(self, version_dir: Path, device: str = "cpu") -> None:
        import torch

        self.version_dir = version_dir
        self.manifest: dict[str, Any] = json.loads((version_dir / "manifest.json").read_text())
        self.version = str(self.manifest.get("version", version_dir.name))
        self.threshold = float(self.manifest.get("threshold", DEFAULT_THRESHOLD))
        self.max_tokens = int(self.manifest.get("max_input_tokens", MAX_INPUT_TOKENS))
        self.device = device
        self.tokenizer = load_tokenizer(version_dir / BODY_DIR)
        model = build_classifier(version_dir / BODY_DIR)
        model.head.load_state_dict(
            torch.load(version_dir / HEAD_FILE, map_location="cpu", weights_only=True)
        )
        self.model: Any = model.to(device).eval()

    def probabilities(
        self, rows: list[tuple[str, str, str, str]], batch_size: int = 16
    ) -> list[float]:
        import torch

        out: list[float] = []
        for start in range(0, len(rows), batch_size):
            batch = encode_batch(self.tokenizer, rows[start : start + batch_size], self.max_tokens)
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()})
            out.extend(torch.softmax(logits, dim=-1)[:, 1].tolist())
        return out


class CriticEngine:
    """Serves ``CURRENT`` of the critic family; reloads when a new version is published."""

    def __init__(self, settings: Settings) -> None:
        self.family = critic_family(settings)
        self.device = resolve_device(settings.device)
        self._loaded: LoadedCritic | None = None
        self._lock = threading.Lock()

    def current(self) -> LoadedCritic:
        version = self.family.current_version()
        if version is None:
            raise CriticNotTrained(self.family.root)
        with self._lock:
            if self._loaded is None or self._loaded.version != version:
                self._loaded = LoadedCritic(self.family.loadable(version), self.device)
            return self._loaded

    @property
    def trained(self) -> bool:
        return self.family.current_version() is not None

    def judge(self, question: str, context: str, answer: str, rationale: str) -> Verdict:
        critic = self.current()
        with self._lock:  # one forward pass at a time: the model is not re-entrant on 2 cores
            (p_accept,) = critic.probabilities([(question, context, answer, rationale)])
        return Verdict(p_accept >= critic.threshold, round(p_accept, 6), critic.version)
