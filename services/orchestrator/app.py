"""Wires the orchestrator: store, clients, pipelines, the LLM and the job queue."""

from __future__ import annotations

from fastapi import FastAPI

from services.orchestrator import feedback_api
from services.orchestrator.api import router
from services.orchestrator.debug import router as debug_router
from services.orchestrator.pipeline import answer_pipeline, search_pipeline
from shared.app import Readiness, create_app
from shared.clients import CriticClient, IndexClient, RerankerClient, RetrieverClient
from shared.jobs import make_celery
from shared.llm import RemoteGenerator, chat_generator
from shared.models import Generator, get_generator
from shared.settings import Settings
from shared.store import Store, database_url


def build_app(settings: Settings) -> FastAPI:
    store = Store(database_url(settings.database_url, settings.data_dir))
    index = IndexClient(settings)
    reranker = RerankerClient(settings)
    # Retrievers served by their own services; asked only when a request names them.
    external = {
        "fm": RetrieverClient("fmindex", settings.fmindex_url, settings),
        "dsi": RetrieverClient("dsi", settings.dsi_url, settings),
    }
    search = search_pipeline(settings, index, reranker=reranker, external=external)

    def generator() -> Generator | RemoteGenerator:
        # Over the OpenAI protocol when LODESTAR_GENERATOR_URL is set, else in this process.
        return chat_generator(settings)

    def local_generator() -> Generator:
        # The shadow LLM agent reads yes/no probabilities, which the protocol does not carry.
        return get_generator(settings)

    # The SIM-RAG critic decides when /answer stops searching; down or untrained, the loop runs
    # to max_rounds and reports it in `degraded`.
    critic = CriticClient(settings)
    answer = answer_pipeline(settings, search, generator, critic=critic)

    def warm_up(readiness: Readiness) -> None:
        model = generator()  # loads the model when in-process; a remote one is asked per call
        readiness.set_ready(
            generator=model.model_id,
            generator_url=settings.generator_url or "in-process",
            store=store.engine.dialect.name,
        )

    async def shutdown() -> None:
        await index.aclose()
        await reranker.aclose()
        await critic.aclose()
        for client in external.values():
            await client.aclose()
        store.close()

    app = create_app(
        "orchestrator",
        settings,
        [router, feedback_api.router],
        warm_up=warm_up,
        on_shutdown=shutdown,
    )
    app.state.store = store
    app.state.index = index
    app.state.search = search
    app.state.answer = answer
    app.state.celery = make_celery(settings)
    feedback_api.install(app, local_generator)  # shadow agents, feedback metrics
    # /debug pages: their own key check (header or cookie); HTML for people, not part of the API
    # document (docs/debug.md describes them).
    app.include_router(debug_router, include_in_schema=False)
    return app
