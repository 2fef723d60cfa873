"""Locust load tests for the orchestrator; run them with ``python -m loadtests.run``."""
