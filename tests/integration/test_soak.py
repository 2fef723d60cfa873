"""The soak and fault bench, bounded (docs/api.md, "Soak and faults"): ``lodestar bench soak`` on
the index, the critic and the orchestrator as real processes, a short mixed load, each service
killed with SIGKILL under it and restarted, and three crash cycles of the orchestrator during
feedback bursts. The full run (30 minutes, 100 cycles, every model service) is the command's
default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from lodestar.bench.soak import run
from tests.conftest import make_settings

SERVICES = ["index", "critic", "orchestrator"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    args = argparse.Namespace(
        services=SERVICES,
        faults=SERVICES,
        docs=40,
        clients=2,
        peak_s=8.0,
        fraction=0.7,
        warmup_s=2.0,
        duration=15.0,
        workers=6,
        rss_every_s=2.0,
        down_s=4.0,
        recover_s=120.0,
        crash_cycles=3,
        burst_threads=3,
        burst_s=1.0,
        env=[],
    )
    settings = make_settings(Path(tmp_path_factory.mktemp("soak")) / "data")
    return run(args, settings)


def test_the_mixed_load_meets_no_unexpected_answer(report: dict[str, Any]) -> None:
    soak = report["soak"]
    assert soak["requests"] > 0 and soak["peak_ops_per_s"] > 0
    assert soak["server_errors_500"] == 0
    assert soak["unexpected"] == 0, soak["unexpected_kinds"]
    assert soak["peak_run"]["unexpected"] == 0, soak["peak_run"]["unexpected_kinds"]
    assert set(soak["rss"]) == set(SERVICES)  # every process measured (growth: see the report)


def test_a_killed_service_makes_its_callers_degrade_or_answer_424_never_500(
    report: dict[str, Any],
) -> None:
    faults = report["faults"]
    assert set(faults) == set(SERVICES)
    for name, fault in faults.items():
        for window in ("while_down", "after_restart"):
            assert fault[window]["server_errors_500"] == 0, (name, window)
            assert fault[window]["unexpected"] == 0, (name, fault[window]["unexpected_kinds"])
        assert fault["recovered"], name
    # What a request that needs the dead service got, asked while it was down:
    assert faults["index"]["probe_while_down"]["status"] == 424
    assert faults["index"]["probe_while_down"]["code"] == "dependency_failed"
    assert faults["critic"]["probe_while_down"]["status"] == 200
    assert "critic" in faults["critic"]["probe_while_down"]["degraded"]
    assert faults["orchestrator"]["probe_while_down"]["status"] is None  # nobody listening


def test_no_acknowledged_feedback_is_lost_across_orchestrator_kills(
    report: dict[str, Any],
) -> None:
    cycles = report["crash_cycles"]
    assert cycles["cycles"] == 3
    assert cycles["acknowledged"] > 0
    assert cycles["lost"] == 0
    assert cycles["replay_mismatch"] == 0
    assert report["summary"]["feedback_lost"] == 0
