"""Wires the reranker engine into the shared service scaffolding."""

from __future__ import annotations

from fastapi import FastAPI

from services.reranker.api import router
from services.reranker.engine import RerankDocument, rerank_engine_from_settings
from shared.app import Readiness, create_app
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = rerank_engine_from_settings(settings)

    def warm_up(readiness: Readiness) -> None:
        docs = [RerankDocument("a", "", "warm up"), RerankDocument("b", "", "the second one")]
        engine.rerank("warm up", docs, "icr")
        engine.rerank("warm up", docs, "cosine")
        readiness.set_ready(model=engine.lm.model_id, methods=["icr", "rankgpt", "cosine"])

    app = create_app("reranker", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
