"""Wires the rewriter engine into the shared service scaffolding.

Warm-up loads SmolLM2 (converting the packaged GGUF once if needed) and rewrites one pair, so
the first request pays no load time; the caches load lazily, per mode and prompt version.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.rewriter.api import router
from services.rewriter.engine import RewriterEngine
from shared.app import Readiness, create_app
from shared.jobs import make_celery
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = RewriterEngine.from_settings(settings)

    def warm_up(readiness: Readiness) -> None:
        generator = engine.generator
        # Straight through the generator: a warm-up rewrite must not land in the cache.
        generator.generate(
            [{"role": "user", "content": "warm up"}], max_new_tokens=1, temperature=0.0
        )
        readiness.set_ready(model=engine.model_id, prompts=engine.config.prompts)

    app = create_app("rewriter", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    app.state.celery = make_celery(settings)
    return app
