"""``lodestar bench``: speed and memory benchmarks (tables, JSON, ratios against a baseline)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Adds the ``bench`` group; each benchmark module registers its subcommand on it."""
    from lodestar.bench.answer import register as register_answer
    from lodestar.bench.cross_encoder import register as register_cross_encoder
    from lodestar.bench.fmindex import register as register_fmindex
    from lodestar.bench.generate import register as register_generate
    from lodestar.bench.index import register as register_index
    from lodestar.bench.ingest import register as register_ingest
    from lodestar.bench.rerank import register as register_rerank
    from lodestar.bench.rerun import register as register_rerun
    from lodestar.bench.search import register as register_search
    from lodestar.bench.soak import register as register_soak
    from lodestar.bench.write_io import register as register_write_io

    group = sub.add_parser(
        "bench", help="speed and memory benchmarks (JSON under benchmarks/results)"
    ).add_subparsers(dest="bench_command", required=True)
    for register_benchmark in (
        register_index,
        register_ingest,
        register_rerank,
        register_fmindex,
        register_cross_encoder,
        register_generate,
        register_answer,
        register_rerun,
        register_search,
        register_soak,
        register_write_io,
    ):
        register_benchmark(group)
