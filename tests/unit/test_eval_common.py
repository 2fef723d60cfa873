"""``resolve_run``: an evaluation's arguments checked before any work."""

from __future__ import annotations

import re

import pytest

from lodestar.evaluation.common import EvalUsageError, resolve_run

DATASETS = {"scifact": "the scifact spec"}
SYSTEMS = {"dense": 1, "bm25": 2}


def test_resolve_run_gives_the_spec_and_the_chosen_entries_in_order() -> None:
    spec, chosen = resolve_run("scifact", DATASETS, ["bm25", "dense"], SYSTEMS, "system", 2)
    assert (spec, chosen) == ("the scifact spec", [2, 1])


@pytest.mark.parametrize(
    ("dataset", "names", "limit", "message"),
    [
        ("nq", ["dense"], None, "unknown dataset 'nq'; known: scifact"),
        ("scifact", [], None, "no system given; known: dense, bm25"),
        ("scifact", ["dense", "colbert"], None, "unknown system 'colbert'"),
        ("scifact", ["dense"], 1, "--limit must be at least 2"),
    ],
)
def test_resolve_run_refuses_bad_arguments(
    dataset: str, names: list[str], limit: int | None, message: str
) -> None:
    with pytest.raises(EvalUsageError, match=re.escape(message)):
        resolve_run(dataset, DATASETS, names, SYSTEMS, "system", limit)
