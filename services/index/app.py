"""Wires the index engine into the shared service scaffolding."""

from __future__ import annotations

from fastapi import FastAPI

from services.index.api import router
from services.index.engine import IndexEngine
from shared.app import Readiness, create_app
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = IndexEngine.from_settings(settings)

    def warm_up(readiness: Readiness) -> None:
        engine.embedder.encode(["warm up"])
        for name in engine.names():
            engine.snapshot(name)
        readiness.set_ready(collections=engine.names())

    app = create_app("index", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
