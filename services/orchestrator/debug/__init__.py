"""User debug mode (NExT-Search): the ``/debug`` pages of the orchestrator (docs/debug.md)."""

from services.orchestrator.debug.routes import router

__all__ = ["router"]
