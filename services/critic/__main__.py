"""``python -m services.critic``: serve the critic with uvicorn."""

from shared.serve import serve

if __name__ == "__main__":
    serve("critic", "services.critic.app:build_app")
