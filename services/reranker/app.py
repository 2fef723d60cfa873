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
        methods = ["icr", "rankgpt", "cosine"]
        if engine.cross_encoder_trained:
            engine.rerank("warm up", docs, "cross-encoder")
            methods.append("cross-encoder")
        # An untrained cross-encoder does not block readiness: it answers 503 until published.
        readiness.set_ready(model=engine.lm.model_id, methods=methods)

    app = create_app("reranker", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
