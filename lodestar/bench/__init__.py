"""``lodestar bench``: speed and memory benchmarks (tables, JSON, ratios against a baseline)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from lodestar.bench.index import register as register_index

    register_index(sub)
