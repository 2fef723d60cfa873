"""Shared fixtures: real models, real PostgreSQL and Redis, real service processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lodestar.bench.common import kill_group, stop_group
from services.index.engine import IndexEngine
from shared.schemas import Document
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
#: Converted model weights are shared across test runs (the GGUF conversion takes ~30 s).
MODELS_DIR = Path(os.environ.get("LODESTAR_MODELS_DIR", ROOT / "var" / "models"))
POSTGRES_ADMIN_URL = os.environ.get(
    "LODESTAR_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LODESTAR_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _neighbour_db(url: str) -> str:
    base, _, db = url.rpartition("/")
    return f"{base}/{(int(db or 0) - 1) % 16}"


#: The session-long ``live_stack``'s broker: a Redis db of its own. Its worker consumes ``cpu``
#: for the whole session, so on the db the module stacks use (``REDIS_URL``) it would take their
#: jobs and fail them against its own data directory; and their flushes would wipe its queues.
LIVE_REDIS_URL = _neighbour_db(REDIS_URL)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, models_dir=MODELS_DIR, log_json=False, **overrides)  # type: ignore[arg-type]


#: Fixtures that need a server, and the marker a test using one carries.
_SERVER_FIXTURES = {"redis_url": "redis", "live_stack": "redis", "postgres_url": "postgres"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests say what they need: one that uses a server's fixture (directly, through another
    fixture, or as the ``postgres`` parameter of the store fixture) is marked for that server,
    so ``-m "not redis and not postgres"`` runs with neither."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "postgres" in callspec.params.values():
            names.add("postgres_url")
        for fixture, marker in _SERVER_FIXTURES.items():
            if fixture in names:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Engines that pin torch to one thread (DSI on CPU) must not slow every later test in the
    same process: put the thread count back after each test."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else len(os.sched_getaffinity(0))
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture(scope="session")
def wiki_sample() -> list[Document]:
    """80 real Wikipedia summaries, always including the articles the tests ask about."""
    from shared.datasets import load_wikipedia_summaries

    docs = load_wikipedia_summaries()
    wanted = {"Mona Lisa", "Leonardo da Vinci", "Eiffel Tower", "Isaac Newton", "Photosynthesis"}
    chosen = [d for d in docs if d.id in wanted]
    chosen += [d for d in docs[::125] if d.id not in wanted][: 80 - len(chosen)]
    return chosen


@pytest.fixture(scope="session")
def built_data_dir(tmp_path_factory: pytest.TempPathFactory, wiki_sample: list[Document]) -> Path:
    """A data directory with a small ``wiki`` collection, built once per session."""
    from services.index.engine import IndexEngine
    from shared.models import get_embedder

    data_dir = tmp_path_factory.mktemp("built")
    settings = make_settings(data_dir)
    IndexEngine(data_dir, lambda: get_embedder(settings)).upsert("wiki", wiki_sample)
    return data_dir


def engine_over_a_copy(built_data_dir: Path, data_dir: Path, **options: Any) -> IndexEngine:
    """An index engine over a private copy of ``built_data_dir``'s collections, so its writes
    do not leak into other tests; ``options`` go to ``IndexEngine``."""
    from shared.models import get_embedder

    shutil.copytree(built_data_dir / "collections", data_dir / "collections")
    settings = make_settings(data_dir)
    return IndexEngine(data_dir, lambda: get_embedder(settings), **options)


# --- PostgreSQL and Redis ----------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"lodestar_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - the server is part of the environment
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is required: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # pragma: no cover
        pytest.fail(f"Redis at {REDIS_URL} is required: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


# --- service processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str]
    env: dict[str, str]

    def stop(self) -> None:
        stop_group(self.popen)

    def kill(self) -> None:
        kill_group(self.popen)

    def restart(self) -> Process:
        """A fresh process with the same command, environment and log (after a kill)."""
        self.stop()
        return spawn(self.name, self.args, self.env, self.log.parent)


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    handle = log.open("ab")
    popen = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    return Process(name, popen, log, args, env)


def wait_ready(url: str, process: Process, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"{process.name} not ready after {timeout_s} s:\n{process.log.read_text()[-3000:]}"
    )


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_")}
    env.update(
        LODESTAR_DATA_DIR=str(data_dir),
        LODESTAR_MODELS_DIR=str(MODELS_DIR),
        LODESTAR_LOG_JSON="false",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def loopback(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@contextmanager
def running(processes: dict[str, Process], ready_at: Mapping[str, str]) -> Iterator[None]:
    """The body runs once each process named in ``ready_at`` is ready at its URL (waited for in
    that order); every process in ``processes`` is stopped afterwards, also when one never got
    ready. A process the body puts in ``processes`` (a restart) is the one stopped."""
    try:
        for name, url in ready_at.items():
            wait_ready(url, processes[name])
        yield
    finally:
        for process in processes.values():
            process.stop()


@dataclass
class Stack:
    orchestrator_url: str
    index_url: str
    data_dir: Path
    processes: dict[str, Process]
    env: dict[str, str]
    #: Each HTTP process's URL by name: ``index``, the extra services, ``orchestrator``.
    urls: dict[str, str] = field(default_factory=dict)


@contextmanager
def start_stack(
    data_dir: Path,
    logs: Path,
    *,
    services: Sequence[str] = (),
    worker_queues: str | None = None,
    orchestrator_env: Mapping[str, str] | None = None,
    **env: str,
) -> Iterator[Stack]:
    """An index, each of ``services`` (``services.<name>``) and an orchestrator as real processes
    over ``data_dir`` on ports of their own, all ready before the body runs and stopped after it;
    with ``worker_queues``, a Celery worker consuming them too. Every process is told each HTTP
    process's port (``LODESTAR_<NAME>_PORT``) and, but for the orchestrator's, its URL
    (``LODESTAR_<NAME>_URL``). ``env`` goes to every process, ``orchestrator_env`` to the
    orchestrator alone (``Stack.env`` is the orchestrator's)."""
    urls: dict[str, str] = {}
    for name in ("index", *services, "orchestrator"):
        port = free_port()
        urls[name] = loopback(port)
        env[f"LODESTAR_{name.upper()}_PORT"] = str(port)
        if name != "orchestrator":
            env[f"LODESTAR_{name.upper()}_URL"] = urls[name]
    common = stack_env(data_dir, **env)
    orchestrator = stack_env(data_dir, **env, **(orchestrator_env or {}))
    processes = {
        name: spawn(name, ["-m", f"services.{name}"], common, logs)
        for name in urls
        if name != "orchestrator"
    }
    processes["orchestrator"] = spawn(
        "orchestrator", ["-m", "services.orchestrator"], orchestrator, logs
    )
    if worker_queues is not None:
        args = ["-m", "services.worker", "--queues", worker_queues]
        processes["worker"] = spawn("worker", args, common, logs)
    stack = Stack(urls["orchestrator"], urls["index"], data_dir, processes, orchestrator, urls)
    with running(processes, urls):
        yield stack


@pytest.fixture(scope="session")
def live_stack(built_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """index + orchestrator + a Celery worker as real processes, Redis as the broker."""
    import redis

    redis.Redis.from_url(LIVE_REDIS_URL).flushdb()
    with start_stack(
        built_data_dir,
        tmp_path_factory.mktemp("logs"),
        worker_queues="cpu",
        LODESTAR_BROKER_URL=LIVE_REDIS_URL,
        LODESTAR_INLINE_INGEST_MAX_DOCS="3",
        LODESTAR_ANSWER_MAX_NEW_TOKENS="24",
    ) as stack:
        yield stack


@contextmanager
def checking_throughout(check: Callable[[], None]) -> Iterator[None]:
    """Call ``check`` over and over on another thread while the body runs; the first exception
    it raises (which stops the loop) fails the test once the body is done."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                check()
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


@contextmanager
def searching_throughout(engine: IndexEngine, collection: str = "wiki") -> Iterator[None]:
    """Search ``collection`` in a loop while the body writes; every search must see a whole
    version (documents and passage groups agree, a full result list)."""

    def search() -> None:
        snapshot, results, _ = engine.search(collection, "painting", 5, ["dense", "bm25"])
        assert snapshot.n_documents == len(snapshot.doc_starts)
        assert len(results["dense"]) == 5

    with checking_throughout(search):
        yield


def read_sse(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """The (event, JSON data) pairs of a streamed server-sent-events response, in order."""
    events: list[tuple[str, dict[str, Any]]] = []
    event = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event:
            events.append((event, json.loads(line.split(":", 1)[1])))
    return events
