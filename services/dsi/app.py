"""Wires the DSI engine into the shared service scaffolding."""

from __future__ import annotations

import torch
from fastapi import FastAPI

from services.dsi.api import router
from services.dsi.engine import DsiEngine
from shared.app import Readiness, create_app
from shared.jobs import make_celery
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = DsiEngine.from_settings(settings)

    def warm_up(readiness: Readiness) -> None:
        # Serving decodes a handful of tokens per query; more threads than cores only contend.
        torch.set_num_threads(1)
        engine.tokenizer  # noqa: B018 - loads the MiniLM tokenizer once
        loaded = []
        for name in engine.names():
            engine.snapshot(name)
            loaded.append(name)
        # Ready without any model: a collection not indexed yet answers 404, not 503.
        readiness.set_ready(collections=loaded)

    app = create_app("dsi", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    app.state.celery = make_celery(settings)
    return app
