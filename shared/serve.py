"""Start a service under uvicorn with its settings (``python -m services.<name>``)."""

from __future__ import annotations

import importlib

import uvicorn

from shared.app import configure_logging
from shared.settings import get_settings


def serve(service: str, factory: str) -> None:
    settings = get_settings()
    configure_logging(settings)
    module_name, _, attribute = factory.partition(":")
    build_app = getattr(importlib.import_module(module_name), attribute)
    app = build_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port_of(service),
        log_config=None,  # our JSON logging, not uvicorn's
        access_log=False,  # GuardMiddleware logs every request with its id and latency
        timeout_graceful_shutdown=10,
    )
