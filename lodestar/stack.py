"""The local stack: every service as its own process, plus a Celery worker.

``up`` starts what is not already running (pid files under ``<data_dir>/run``), waits for each
service's ``/readyz``, and prints the URLs; ``down`` stops exactly the processes ``up`` started
(a pid is only signalled while its command line still matches what was launched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.settings import DEFAULT_PORTS, Settings


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    module: str
    args: tuple[str, ...] = ()
    port_service: str | None = None  # the service whose /readyz tells that this process is up
    env: tuple[tuple[str, str], ...] = ()  # defaults for this process; the caller's env wins

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


# One BLAS / OpenMP / torch thread: a query is a dozen tokens and one 10k x 384 product, too
# little work to split, and with several requests (or other jobs) on the cores extra threads only
# contend. With 4 Locust clients on the shared 2-core machine, /search p50 / p95 were 78 / 170 ms
# with one thread against 130 / 350 ms with the defaults (docs/index.md).
SINGLE_THREADED = (
    ("OMP_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
)


STACK: tuple[ProcessSpec, ...] = (
    ProcessSpec("index", "services.index", port_service="index", env=SINGLE_THREADED),
    ProcessSpec("reranker", "services.reranker", port_service="reranker"),
    # Ready before any critic is trained: /judge answers 503 and /answer degrades to max_rounds.
    ProcessSpec("critic", "services.critic", port_service="critic"),
    # CAR rewriting of training queries (SmolLM2 loads in about a second once converted).
    ProcessSpec("rewriter", "services.rewriter", port_service="rewriter"),
    # Ready with no model (tokenizer only): a collection without a trained DSI answers 404.
    ProcessSpec("dsi", "services.dsi", port_service="dsi"),
    # Ready with no FM-index built (the LM loads in seconds): such a collection answers 404.
    ProcessSpec("fmindex", "services.fmindex", port_service="fmindex"),
    # OpenAI-compatible generation with batching; /answer's generation goes through it. One
    # thread: at load ~11 on the 2 cores, 32 tokens took 44 s with torch's default two threads
    # (and the next requests ran past the 60 s deadline) against 6.3-7.6 s with one.
    ProcessSpec("generator", "services.generator", port_service="generator", env=SINGLE_THREADED),
    ProcessSpec(
        "orchestrator",
        "services.orchestrator",
        port_service="orchestrator",
        env=(("LODESTAR_GENERATOR_URL", f"http://127.0.0.1:{DEFAULT_PORTS['generator']}"),),
    ),
    ProcessSpec("worker-cpu", "services.worker", ("--queues", "cpu")),
)


def _run_dir(settings: Settings) -> Path:
    path = settings.data_dir / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_dir(settings: Settings) -> Path:
    path = settings.data_dir / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file(settings: Settings, name: str) -> Path:
    return _run_dir(settings) / f"{name}.json"


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def running_pid(settings: Settings, spec: ProcessSpec) -> int | None:
    """The pid ``up`` recorded for ``spec``, if that process is still the one it launched."""
    path = _pid_file(settings, spec.name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    if _cmdline(pid) == record["command"]:
        return pid
    path.unlink(missing_ok=True)  # stale: the process is gone or the pid was reused
    return None


def start(settings: Settings, spec: ProcessSpec, env: dict[str, str]) -> int:
    existing = running_pid(settings, spec)
    if existing is not None:
        return existing
    log = (_log_dir(settings) / f"{spec.name}.log").open("ab")
    command = spec.command()
    env = {**dict(spec.env), **env}
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=os.getcwd(),
    )
    _pid_file(settings, spec.name).write_text(json.dumps({"pid": process.pid, "command": command}))
    return process.pid


def stop(settings: Settings, spec: ProcessSpec, timeout_s: float = 20.0) -> bool:
    pid = running_pid(settings, spec)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _cmdline(pid) is not None:
        time.sleep(0.2)
    if _cmdline(pid) is not None:
        os.killpg(pid, signal.SIGKILL)
    _pid_file(settings, spec.name).unlink(missing_ok=True)
    return True


def service_url(settings: Settings, service: str) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port_of(service)}"


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(settings: Settings, specs: tuple[ProcessSpec, ...], timeout_s: float) -> list[str]:
    """Names of the services still not ready after ``timeout_s`` (empty when all are)."""
    pending = {s.name: service_url(settings, s.port_service) for s in specs if s.port_service}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            if is_ready(url):
                del pending[name]
        for spec in specs:
            if spec.name in pending and running_pid(settings, spec) is None:
                raise RuntimeError(
                    f"{spec.name} exited during start-up; see {_log_dir(settings) / (spec.name + '.log')}"
                )
        time.sleep(0.5)
    return sorted(pending)
