"""``python -m services.rewriter``: serve the rewriter with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("rewriter", "services.rewriter.app:build_app")
