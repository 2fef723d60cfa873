"""Lodestar's shared library: what several services use (settings, API scaffolding, schemas,
clients, models, data, metrics, store, jobs). Engines live in ``services/<name>/``."""
