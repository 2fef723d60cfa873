"""Wires the generator: SmolLM2 (converted once from the packaged GGUF) behind the batching
engine, the OpenAI routes, and the platform scaffolding (429 admission, deadline, metrics).

Warm-up loads the model, starts the batch thread and generates one token, so the first request
pays no load time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from prometheus_client import Counter, Histogram

from services.generator.api import router
from services.generator.engine import BatchingEngine, SamplingParams
from services.generator.errors import OpenAIErrorShape
from shared.app import Readiness, create_app
from shared.models import get_generator
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    metrics: dict[str, Any] = {}

    def on_batch(size: int, tokens: int) -> None:
        metrics["batch_size"].observe(size)
        metrics["tokens"].inc(tokens)

    def warm_up(readiness: Readiness) -> None:
        engine = BatchingEngine(
            get_generator(settings),
            batch_window_ms=settings.generator_batch_window_ms,
            max_batch=settings.generator_max_batch,
            batch_tokens=settings.generator_batch_tokens,
            on_batch=on_batch,
        )
        engine.start()
        engine.generate_blocking(
            engine.prompt_ids([{"role": "user", "content": "warm up"}]), SamplingParams(1)
        )
        app.state.engine = engine
        readiness.set_ready(model=engine.model_id, max_batch=engine.max_batch)

    async def shutdown() -> None:
        engine: BatchingEngine | None = getattr(app.state, "engine", None)
        if engine is not None:
            await asyncio.to_thread(engine.stop)  # lets the running batch finish

    app = create_app("generator", settings, [router], warm_up=warm_up, on_shutdown=shutdown)
    app.add_middleware(OpenAIErrorShape)
    # How well batching works in practice: requests per generate call, and tokens generated.
    registry = app.state.metrics_registry
    metrics["batch_size"] = Histogram(
        "generator_batch_size",
        "Requests per batched generate call",
        registry=registry,
        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
    )
    metrics["tokens"] = Counter(
        "generator_completion_tokens", "Tokens generated (all rows)", registry=registry
    )
    return app
