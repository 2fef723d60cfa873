"""``python -m services.fmindex``: serve the SEAL fmindex service with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("fmindex", "services.fmindex.app:build_app")
