"""The orchestrator: Lodestar's single public entry point (/search, /answer, /feedback)."""
