"""``lodestar experiment``: research experiments that write a JSON, a Markdown report and plots."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Adds the ``experiment`` group; each experiment module registers its subcommand on it."""
    group = sub.add_parser(
        "experiment", help="reproducible experiments (JSON + Markdown report + PNG plots)"
    ).add_subparsers(dest="experiment_command", required=True)
    from lodestar.experiments.hnsw_order import register as register_hnsw_order

    register_hnsw_order(group)
    from lodestar.experiments.dsi_protocol import register as register_dsi

    register_dsi(group)
    from lodestar.experiments.car import register as register_car

    register_car(group)
    from lodestar.experiments.feedback import register as register_feedback

    register_feedback(group)
    del group  # experiments register here: ``register_<name>(group)``
