"""FM-index-constrained beam search with a causal LM (SEAL's ``fm_index_generate``).

Every beam carries the BWT interval of the n-gram it has generated so far. At each step the only
tokens a beam may take are the distinct continuations of that n-gram in the index (everything
else is −inf), so every generated n-gram occurs in the corpus by construction. The first body step
allows every token that occurs (SEAL's ``occurring_distinct``); title decoding starts from the
interval of the document separator, so it can only produce the beginning of a real title, and
ends at ``<TITLE_EOS>`` (only complete titles are kept).

Scores are log-softmax over the *whole* vocabulary, taken before masking, so a beam's score is
exactly the teacher-forced ``log P(n | q)`` (SEAL's ``rescore`` pass with ``length_penalty=0``
recomputes this number; here it needs no second pass). With ``keep_history`` every partial
hypothesis of every step is returned as an n-gram, as SEAL's searcher does.

Diverse beam search (Vijayakumar et al., AAAI 2018, Hamming diversity): the beam is split into
``groups``; groups decode in turn at each step and group g subtracts ``diversity_penalty ×
(times the token was chosen by groups 1..g−1 at this step)`` from its candidates' scores for
selection only (stored scores stay true log-probabilities; the FM mask is applied before and is
never lifted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.fmindex.fm import FMIndex


@dataclass(frozen=True)
class DecodedNgram:
    tokens: tuple[int, ...]
    logprob: float


@dataclass
class DecodeResult:
    ngrams: list[DecodedNgram]
    forward_passes: int
    seconds_model: float
    seconds_index: float
    steps: int


class CausalLM:
    """The generator: a causal LM whose next-token log-probs drive the search (KV-cached)."""

    def __init__(self, model_dir: Any, device: str = "cpu", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.device = device
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model: Any = model.to(device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        # One search at a time: concurrent forwards on two cores are each slower than serial.
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    def start(self, prompt: Sequence[int]) -> tuple[Any, np.ndarray]:
        """Run the prompt; return the cache and the next-token log-probs (vocab,)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return cache, logprobs.cpu().numpy()

    def step(
        self, cache: Any, parents: Sequence[int], tokens: Sequence[int]
    ) -> tuple[Any, np.ndarray]:
        """Advance the beams: ``parents[i]`` is the cache row new beam i continues with
        ``tokens[i]``. Returns the new cache and log-probs (beams, vocab)."""
        import torch

        with torch.inference_mode():
            index = torch.tensor(list(parents), dtype=torch.long, device=self.device)
            cache.reorder_cache(index)
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
            logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return cache, logprobs.cpu().numpy()


@dataclass
class _Beam:
    tokens: tuple[int, ...]
    score: float
    lo: int
    hi: int
    row: int
    """Row of this beam's state in the model cache."""
    group: int = 0


@dataclass
class SearchConfig:
    beam: int = 15
    max_length: int = 10
    groups: int = 1
    diversity_penalty: float = 0.0
    banned: frozenset[int] = field(default_factory=frozenset)
    """Tokens never generated (the document separator inside body n-grams)."""


def constrained_beam_search(
    lm: CausalLM,
    fm: FMIndex,
    prompt: Sequence[int],
    config: SearchConfig,
    *,
    start: tuple[int, int] | None = None,
    eos: int | None = None,
    keep_history: bool = True,
    initial: tuple[Any, np.ndarray] | None = None,
) -> DecodeResult:
    """Beam search whose every hypothesis occurs in ``fm`` (starting inside ``start``).

    With ``eos`` (title decoding), only hypotheses that end with ``eos`` are returned and
    ``keep_history`` is ignored. ``initial`` reuses an already computed prompt pass.
    """
    if config.beam < 1 or config.groups < 1 or config.beam % config.groups:
        raise ValueError("beam must be a positive multiple of groups")
    per_group = config.beam // config.groups
    model_s = index_s = 0.0
    t0 = time.perf_counter()
    cache, first = initial if initial is not None else lm.start(prompt)
    model_s += time.perf_counter() - t0
    passes = 0 if initial is not None else 1
    lo, hi = start if start is not None else fm.full_range()
    beams = [_Beam((), 0.0, lo, hi, 0, g) for g in range(config.groups)]
    logprobs = first[None, :]
    history: dict[tuple[int, ...], float] = {}
    finished: dict[tuple[int, ...], float] = {}
    banned = np.asarray(sorted(config.banned), dtype=np.int64)
    steps = 0
    for _step in range(config.max_length):
        steps += 1
        t0 = time.perf_counter()
        chosen: list[tuple[_Beam, int, float]] = []
        picked_counts: dict[int, int] = {}
        for group in range(config.groups):
            cand_beam: list[int] = []
            cand_tok: list[np.ndarray] = []
            cand_score: list[np.ndarray] = []
            members = [i for i, b in enumerate(beams) if b.group == group]
            for i in members:
                beam = beams[i]
                allowed, _counts = fm.continuations_in(beam.lo, beam.hi)
                if banned.size:
                    allowed = allowed[~np.isin(allowed, banned)]
                allowed = allowed[allowed < logprobs.shape[1]]
                if allowed.size == 0:
                    continue
                cand_beam.extend([i] * allowed.size)
                cand_tok.append(allowed)
                cand_score.append(beam.score + logprobs[beam.row, allowed])
            if not cand_tok:
                continue
            tokens = np.concatenate(cand_tok)
            scores = np.concatenate(cand_score).astype(np.float64)
            selection = scores.copy()
            if config.diversity_penalty and picked_counts:
                penalty = np.array([picked_counts.get(int(t), 0) for t in tokens], dtype=np.float64)
                selection -= config.diversity_penalty * penalty
            take = min(per_group, tokens.size)
            top = np.argpartition(-selection, take - 1)[:take]
            top = top[np.argsort(-selection[top], kind="stable")]
            for j in top:
                token = int(tokens[j])
                picked_counts[token] = picked_counts.get(token, 0) + 1
                chosen.append((beams[cand_beam[j]], token, float(scores[j])))
        index_s += time.perf_counter() - t0
        if not chosen:
            break
        t0 = time.perf_counter()
        next_beams: list[_Beam] = []
        for parent, token, score in chosen:
            new_tokens = (*parent.tokens, token)
            if eos is not None and token == eos:
                if score > finished.get(new_tokens, -np.inf):
                    finished[new_tokens] = score
                continue
            new_lo, new_hi = fm.extend(parent.lo, parent.hi, token)
            if new_lo >= new_hi:  # cannot happen: the token came from the interval itself
                raise AssertionError("constrained decoding left the index")
            if score > history.get(new_tokens, -np.inf):
                history[new_tokens] = score
            next_beams.append(_Beam(new_tokens, score, new_lo, new_hi, parent.row, parent.group))
        if eos is not None and len(finished) >= config.beam:
            # Log-probs only fall as hypotheses grow: a live beam already below the beam-th best
            # finished title can never overtake it.
            bar = sorted(finished.values(), reverse=True)[config.beam - 1]
            next_beams = [b for b in next_beams if b.score > bar]
        index_s += time.perf_counter() - t0
        if not next_beams or _step == config.max_length - 1:
            break
        t0 = time.perf_counter()
        cache, logprobs = lm.step(
            cache, [b.row for b in next_beams], [b.tokens[-1] for b in next_beams]
        )
        model_s += time.perf_counter() - t0
        passes += 1
        for row, beam in enumerate(next_beams):
            beam.row = row
        beams = next_beams
    source = (
        finished
        if eos is not None
        else (history if keep_history else {b.tokens: b.score for b in beams})
    )
    ngrams = [DecodedNgram(tokens, score) for tokens, score in source.items()]
    ngrams.sort(key=lambda n: -n.logprob)
    return DecodeResult(ngrams, passes, model_s, index_s, steps)
