"""Start a service under uvicorn with its settings (``python -m services.<name>``)."""

from __future__ import annotations

import ctypes
import importlib
import logging
import sys

import uvicorn

from shared.app import configure_logging
from shared.settings import get_settings

logger = logging.getLogger("lodestar")

#: mallopt's parameter number for the arena limit (glibc's malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; False where there is no glibc
    (or ``arenas`` is 0: keep its default)."""
    if arenas <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: their allocators have no arenas to cap
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def serve(service: str, factory: str) -> None:
    settings = get_settings()
    configure_logging(settings)
    # Before the app's threads exist: an arena is created the first time a thread allocates.
    if settings.malloc_arena_max and not limit_malloc_arenas(settings.malloc_arena_max):
        logger.warning("malloc_arena_max=%d not applied (no glibc)", settings.malloc_arena_max)
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
