"""Wires the fmindex engine into the shared service scaffolding.

The service starts without any built collection: it becomes ready once the generator is loaded,
and ``/search`` on a collection that has not been built answers 404 (``not_found``), never a
crash. Warm-up compiles the numba kernels on the first collection it finds.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.fmindex.api import router
from services.fmindex.engine import FmEngine, FmSettings
from shared.app import Readiness, create_app
from shared.settings import Settings


def build_app(settings: Settings, fm_settings: FmSettings | None = None) -> FastAPI:
    engine = FmEngine.from_settings(settings, fm_settings)

    def warm_up(readiness: Readiness) -> None:
        engine.lm.encode("warm up")
        names = engine.names()
        for name in names:
            collection = engine.collection(name)
            collection.fm.count([0])
            collection.fm.continuations_in(*collection.fm.range([0]))
            collection.fm.locate([0], limit=1)
        readiness.set_ready(
            generator=engine.generator_name,
            collections=names,
            beam=engine.fm_settings.beam,
            length=engine.fm_settings.length,
        )

    app = create_app("fmindex", settings, [router], warm_up=warm_up)
    app.state.engine = engine
    return app
