"""Wires the index engine into the shared service scaffolding."""

from __future__ import annotations

from fastapi import FastAPI

from services.index.api import router
from services.index.engine import IndexEngine
from shared.app import Readiness, create_app
from shared.artifacts import CorruptArtifact
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = IndexEngine.from_settings(settings)

    def warm_up(readiness: Readiness) -> None:
        # Start-up pays for what requests would otherwise pay once: the ONNX export (first
        # start only, cached on disk), both encoders' lazy initialisation, the snapshots.
        engine.embedder.encode(["warm up"])
        engine.embedder.encode_queries(["warm up"])
        corrupt: dict[str, str] = {}
        for name in engine.names():
            try:
                engine.snapshot(name)
            except CorruptArtifact as exc:  # one bad collection does not take the others down
                corrupt[name] = exc.message
        readiness.set_ready(
            collections=[n for n in engine.names() if n not in corrupt],
            corrupt_collections=corrupt,
            query_encoder=engine.embedder.query_backend,
        )

    app = create_app("index", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
