"""``python -m services.dsi``: serve the DSI++ service with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("dsi", "services.dsi.app:build_app")
