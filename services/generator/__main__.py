"""``python -m services.generator``: serve the generator with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("generator", "services.generator.app:build_app")
