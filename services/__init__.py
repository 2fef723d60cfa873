"""Lodestar services: one package per FastAPI service (engine, api, __main__)."""
