"""``lodestar up`` gives a process its spec's environment defaults; the caller's env wins."""

from __future__ import annotations

import os
from pathlib import Path

from lodestar import stack
from tests.conftest import make_settings


def test_spec_env_defaults_reach_the_process_and_the_callers_env_overrides(
    tmp_path: Path,
) -> None:
    (tmp_path / "probe_env.py").write_text(
        "import os\nprint(os.environ['PROBE_A'], os.environ['PROBE_B'], flush=True)\n"
    )
    settings = make_settings(tmp_path / "data")
    spec = stack.ProcessSpec(
        "probe", "probe_env", env=(("PROBE_A", "from-spec"), ("PROBE_B", "from-spec"))
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_B": "from-caller"}
    pid = stack.start(settings, spec, env)
    _, status = os.waitpid(pid, 0)  # our child: wait for it to print and exit
    assert os.waitstatus_to_exitcode(status) == 0
    log = settings.data_dir / "logs" / "probe.log"
    assert log.read_text().split() == ["from-spec", "from-caller"]


def test_the_index_service_runs_single_threaded_by_default() -> None:
    index = next(spec for spec in stack.STACK if spec.name == "index")
    assert dict(index.env) == {
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
