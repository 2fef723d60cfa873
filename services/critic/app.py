"""Wires the critic engine into the shared service scaffolding.

The service is ready as soon as it runs, trained or not: without a published critic ``/judge``
answers 503 ``unavailable`` and the orchestrator's loop degrades to ``max_rounds``.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.critic.api import router
from services.critic.engine import CriticEngine
from shared.app import Readiness, create_app
from shared.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    engine = CriticEngine(settings)

    def warm_up(readiness: Readiness) -> None:
        if engine.trained:
            critic = engine.current()
            engine.judge("warm up", "", "warm up", "")
            readiness.set_ready(model=critic.version, trained=True)
        else:
            readiness.set_ready(model=None, trained=False)

    app = create_app("critic", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
