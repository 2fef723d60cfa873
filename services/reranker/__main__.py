"""``python -m services.reranker``: serve the reranker service with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("reranker", "services.reranker.app:build_app")
