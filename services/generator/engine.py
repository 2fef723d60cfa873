"""Batched chat generation on one causal LM: the engine behind the generator service.

Concurrent requests are gathered for a short window (``batch_window_ms``) into one left-padded
``generate`` call, so on the CPU several requests share each decoding step (a step over 4 rows
costs far less than 4 steps over 1) instead of queueing behind each other.

What it guarantees:

- **Batched greedy output equals unbatched greedy output**: rows are left-padded with an
  attention mask, so each row's positions and attended tokens are those it would have alone.
  Rows stop on their own ``max_tokens``, EOS, ``stop`` strings, cancellation or deadline
  (``_RowControl``, a ``StoppingCriteria``); the batch ends when every row has.
- **Sampling is reproducible per request**: a request with ``temperature > 0`` runs alone,
  seeded from ``seed`` (a shared batch would make one row's draws depend on the others').
- **A token budget per batch** (rows x (longest prompt + most new tokens), the padded KV cache)
  bounds memory; a request over the budget on its own still runs, alone.
- **Cancellation**: ``Job.cancel()`` (client gone, deadline passed) stops that row at the next
  step; the others go on.

It runs the model in one worker thread; results come back through each job's ``emit`` callback
(``Delta`` pieces of text, then one ``Done``), so an asyncio caller and a blocking one
(``generate_blocking``) use the same path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.models import Generator

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Delta:
    """New text of one job (never split inside a UTF-8 character or a possible stop string)."""

    text: str


@dataclass(frozen=True)
class Done:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    seconds: float
    batch_size: int


Event = Delta | Done


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    deadline: float | None = None
    """``time.time()`` past which the job stops (``finish_reason`` ``cancelled``)."""
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (
            self.deadline is not None and time.time() > self.deadline
        )

    def padded_cost(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


def stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string
    (or are half a UTF-8 character): those are not streamed until the next token decides."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    if text.endswith("\ufffd"):  # the tokenizer's placeholder for an incomplete byte sequence
        hold = max(hold, 1)
    return hold


class _Row:
    """One job's state inside a running batch."""

    def __init__(self, job: Job, tokenizer: Any, eos_ids: set[int]) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: FinishReason | None = None

    def step(self, token: int) -> None:
        """Take the row's next token; sets ``finish`` when the row is done."""
        if self.finish is not None:
            return
        if self.job.cancelled:
            self.finish = "cancelled"
            return
        self.ids.append(token)
        stops = self.job.params.stop
        if token in self.eos_ids:
            self.finish = "stop"  # the text is what the tokens before EOS decoded to
        else:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish = "stop"
            elif len(self.ids) >= self.job.params.max_tokens:
                self.finish = "length"
        # A finished row flushes what it held back; a running one keeps a possible stop prefix.
        ready = len(self.text) if self.finish else len(self.text) - stop_hold_back(self.text, stops)
        if ready > self.sent:
            self.job.emit(Delta(self.text[self.sent : ready]))
            self.sent = ready


class _RowControl:
    """A transformers ``StoppingCriteria``: feeds each row its new token and reports which rows
    are done, so rows stop independently and ``generate`` returns when all have."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last, strict=True):
            row.step(int(token))
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


class BatchingEngine:
    """Gathers concurrent jobs into padded batched ``generate`` calls on one worker thread."""

    def __init__(
        self,
        generator: Generator,
        *,
        batch_window_ms: float = 20.0,
        max_batch: int = 8,
        batch_tokens: int = 16384,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.generator = generator
        self.model_id = generator.model_id
        self.tokenizer: Any = generator.tokenizer
        self.window_s = batch_window_ms / 1000
        self.max_batch = max_batch
        self.batch_tokens = batch_tokens
        eos = generator.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos_list if e is not None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.pad_id = int(
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos_ids)
        )
        self._pending: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._carried: deque[Job] = deque()  # taken from the queue but left for the next batch
        self._thread: threading.Thread | None = None
        self.on_batch = on_batch
        """Called after each batch with its size and the tokens it generated (metrics)."""

    # --- public API -----------------------------------------------------------------------

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(i) for i in encoded["input_ids"]]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="generator-batches", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> Job:
        self.start()
        self._pending.put(job)
        return job

    def generate_blocking(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        deadline: float | None = None,
    ) -> Done:
        """Submit one job and wait for its ``Done`` (benchmarks, tests, warm-up)."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.submit(Job(prompt_ids, params, events.put, deadline))
        while True:
            event = events.get()
            if isinstance(event, Done):
                return event

    # --- the worker thread ----------------------------------------------------------------

    def _next_job(self, timeout: float | None) -> Job | None:
        if self._carried:
            return self._carried.popleft()
        try:
            return (
                self._pending.get(timeout=timeout) if timeout != 0 else self._pending.get_nowait()
            )
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """``first`` plus the greedy jobs that arrive while the window is open and fit the
        budget. The window stays open ``window_s`` past the latest arrival (at most four windows
        in all): requests sent together reach the engine spread out by their parsing and
        tokenising, which on a loaded machine takes longer than one fixed window."""
        batch = [first]
        if not first.params.greedy:
            return batch
        longest_prompt = len(first.prompt_ids)
        most_new = first.params.max_tokens
        opened = time.perf_counter()
        closes = opened + self.window_s
        while len(batch) < self.max_batch:
            left = closes - time.perf_counter()
            job = self._next_job(left) if left > 0 else self._next_job(0)
            if job is None:
                break
            prompt = max(longest_prompt, len(job.prompt_ids))
            new = max(most_new, job.params.max_tokens)
            if not job.params.greedy or (len(batch) + 1) * (prompt + new) > self.batch_tokens:
                self._carried.append(job)
                break
            batch.append(job)
            longest_prompt, most_new = prompt, new
            closes = min(opened + 4 * self.window_s, time.perf_counter() + self.window_s)
        return batch

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            first = self._next_job(None)
            if first is None:
                return
            batch = self._gather(first)
            live = [job for job in batch if not job.cancelled]
            for job in batch:
                if job.cancelled:
                    job.emit(Done("", len(job.prompt_ids), 0, "cancelled", 0.0, 0))
            if not live:
                continue
            try:
                self._run(live)
            except Exception as exc:  # a model failure must not kill the loop for later jobs
                logger.exception("batched generation failed")
                for job in live:
                    job.emit(Done(str(exc), len(job.prompt_ids), 0, "error", 0.0, len(live)))

    def _run(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteriaList

        started = time.perf_counter()
        rows = [_Row(job, self.tokenizer, self.eos_ids) for job in jobs]
        width = max(len(job.prompt_ids) for job in jobs)
        # Left padding: every row's last prompt token sits in the last column, where generation
        # continues; the mask hides the padding and sets each row's positions from its own start.
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        params = jobs[0].params
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(job.params.max_tokens for job in jobs),
            "pad_token_id": self.pad_id,
            "stopping_criteria": StoppingCriteriaList([_RowControl(rows)]),
        }
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        device = self.generator.device
        with torch.inference_mode():
            self.generator.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
            )
        if self.on_batch is not None:
            self.on_batch(len(jobs), sum(len(row.ids) for row in rows))
        elapsed = time.perf_counter() - started
        for row in rows:
            finish: FinishReason = row.finish or "length"
            if row.finish is None and row.job.cancelled:
                finish = "cancelled"
            row.job.emit(
                Done(row.text, len(row.job.prompt_ids), len(row.ids), finish, elapsed, len(jobs))
            )
