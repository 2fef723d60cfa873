"""``python -m services.orchestrator``: serve the public API with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("orchestrator", "services.orchestrator.app:build_app")
