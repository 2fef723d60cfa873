"""``lodestar experiment dsi`` end to end on a tiny corpus and model: the report files, the
retraining reference at the last step only, and methods in worker processes giving the same
numbers as in one process."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lodestar.experiments.dsi_protocol import ProtocolConfig, run_protocol
from shared.settings import Settings

TINY = ProtocolConfig(
    docs=24,
    corpora=2,
    methods=("naive", "genmem", "retrain"),
    d_model=32,
    layers=1,
    d0_epochs=2,
    step_epochs=1,
    qg_epochs=1,
    query_generator="t5",
    pseudo_per_doc=1,
    batch_size=8,
    beam=3,
    leaf_size=4,
    clusters=3,
)


def test_protocol_in_worker_processes_matches_one_process(tmp_path: Path) -> None:
    settings = Settings()
    one = run_protocol(TINY, tmp_path / "one", settings)
    two = run_protocol(replace(TINY, jobs=2, retrain="last"), tmp_path / "two", settings)

    for out in ("one", "two"):
        for name in ("protocol.json", "REPORT.md", "forgetting_retrieval_hits10.png"):
            assert (tmp_path / out / name).stat().st_size > 0
        leftovers = [p.name for p in (tmp_path / out).iterdir() if p.is_dir()]
        assert not leftovers, "the D0 hand-over to the workers is cleaned up"
    assert json.loads((tmp_path / "two" / "protocol.json").read_text())["config"]["jobs"] == 2

    # Same seeds, same D0 model: a method's numbers do not depend on the process it ran in.
    for name in ("naive", "genmem"):
        assert one["methods"][name]["metrics"] == two["methods"][name]["metrics"]
        assert one["methods"][name]["updates"] == two["methods"][name]["updates"]
    assert one["methods"]["genmem"]["updates_total"] > one["methods"]["naive"]["updates_total"]

    # Retraining only at the last step: the middle step is neither trained nor evaluated, the
    # last step equals the every-step reference's (same seed, same data, from scratch).
    every, last = one["methods"]["retrain"], two["methods"]["retrain"]
    assert last["steps_trained"] == [0, 2] and every["steps_trained"] == [0, 1, 2]
    assert last["metrics"]["ret@10"]["P"][1] is None and last["metrics"]["ret@10"]["F"] is None
    assert last["metrics"]["ret@10"]["P"][2] == every["metrics"]["ret@10"]["P"][2]
    assert last["updates"][1] == 0 and last["updates"][2] == every["updates"][2]
    assert "| retrain |" in (tmp_path / "two" / "REPORT.md").read_text()
