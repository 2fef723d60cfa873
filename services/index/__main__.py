"""``python -m services.index``: serve the index service with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("index", "services.index.app:build_app")
