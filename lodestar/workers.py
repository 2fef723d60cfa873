"""``lodestar workers list | scale | logs``: Celery worker containers through the Docker SDK.

``scale --queue cpu|gpu --replicas N`` runs N worker containers for a queue beside whatever the
compose stack runs itself (its ``worker-cpu`` is not counted or touched). New replicas copy the
configuration of a template container: the running compose worker of that queue (labels
``lodestar.role=worker`` and ``lodestar.queue=<queue>``) unless ``--template NAME`` names
another, so they get the same image, environment, volumes, network mode and user. Each replica
gets its own host name, hence its own Celery node name ``lodestar-<queue>@<name>``. GPU
replicas ask the engine for NVIDIA devices (``device_requests``, as ``docker run --gpus``).

Scaling down stops and removes the highest-numbered replicas first (SIGTERM: Celery finishes the
task in hand within the stop timeout; tasks are acknowledged late, so one cut short is
redelivered). The engine is the one ``DOCKER_HOST`` names (the Docker SDK's ``from_env``).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK is imported only when a command runs (dev extra: docker)
    from docker import DockerClient
    from docker.models.containers import Container

QUEUES = ("cpu", "gpu")
ROLE_LABEL = "lodestar.role"
QUEUE_LABEL = "lodestar.queue"
MANAGED_LABEL = "lodestar.managed-by"
MANAGER = "lodestar-workers"
REPLICA_LABEL = "lodestar.replica"
DEFAULT_IMAGES = {"cpu": "lodestar:cpu", "gpu": "lodestar:gpu"}
STOP_TIMEOUT_S = 30


class WorkersError(RuntimeError):
    """A request the engine cannot satisfy (no engine, no template, an unknown name)."""


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    queue: str
    status: str
    health: str
    image: str
    managed: bool


def client() -> DockerClient:
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise WorkersError("the Docker SDK is not installed: pip install docker==7.2.0") from exc
    try:
        engine = docker.from_env(timeout=30)
        engine.ping()
    except Exception as exc:
        raise WorkersError(
            f"no Docker engine answers ({exc}); deploy/engine.sh starts one"
        ) from exc
    return engine


def replica_name(prefix: str, queue: str, index: int) -> str:
    # Not "<prefix>-worker-<queue>-<n>": that is compose's own name for its worker container.
    return f"{prefix}-replica-{queue}-{index}"


def container_spec(
    queue: str, index: int, template: dict[str, Any] | None, *, prefix: str, image: str | None
) -> dict[str, Any]:
    """Keyword arguments of ``containers.run`` for replica ``index`` of ``queue``.

    ``template`` is a container's ``attrs`` (``docker inspect``) whose image, environment,
    mounts, network mode and user the replica copies; None starts from the image alone.
    """
    if queue not in QUEUES:
        raise WorkersError(f"unknown queue {queue!r}; known: {', '.join(QUEUES)}")
    name = replica_name(prefix, queue, index)
    config = (template or {}).get("Config", {})
    host = (template or {}).get("HostConfig", {})
    spec: dict[str, Any] = {
        "image": image or config.get("Image") or DEFAULT_IMAGES[queue],
        "command": ["python", "-m", "services.worker", "--queues", queue],
        "name": name,
        "hostname": name,
        "detach": True,
        "labels": {
            ROLE_LABEL: "worker",
            QUEUE_LABEL: queue,
            MANAGED_LABEL: MANAGER,
            REPLICA_LABEL: str(index),
        },
        "environment": list(config.get("Env") or []),
        "restart_policy": {"Name": "unless-stopped"},
        "stop_signal": "SIGTERM",
    }
    if config.get("User"):
        spec["user"] = config["User"]
    if config.get("WorkingDir"):
        spec["working_dir"] = config["WorkingDir"]
    network_mode = host.get("NetworkMode")
    if network_mode and network_mode != "default":
        spec["network_mode"] = network_mode
    mounts = []
    for mount in (template or {}).get("Mounts", []):
        if mount.get("Type") == "volume":
            mounts.append(
                f"{mount['Name']}:{mount['Destination']}:{'rw' if mount.get('RW', True) else 'ro'}"
            )
        elif mount.get("Type") == "bind":
            mounts.append(
                f"{mount['Source']}:{mount['Destination']}:{'rw' if mount.get('RW', True) else 'ro'}"
            )
    if mounts:
        spec["volumes"] = mounts
    if queue == "gpu":
        from docker.types import DeviceRequest

        spec["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return spec


def _worker_containers(engine: DockerClient, queue: str | None = None) -> list[Container]:
    filters: dict[str, Any] = {"label": [f"{ROLE_LABEL}=worker"]}
    if queue:
        filters["label"].append(f"{QUEUE_LABEL}={queue}")
    return list(engine.containers.list(all=True, filters=filters))


def _managed(engine: DockerClient, queue: str, prefix: str) -> list[Container]:
    pattern = re.compile(rf"^{re.escape(prefix)}-replica-{queue}-(\d+)$")
    return sorted(
        (
            c
            for c in _worker_containers(engine, queue)
            if c.labels.get(MANAGED_LABEL) == MANAGER and pattern.match(c.name or "")
        ),
        key=lambda c: int(c.labels.get(REPLICA_LABEL, "0")),
    )


def list_workers(engine: DockerClient) -> list[WorkerInfo]:
    rows = []
    for c in _worker_containers(engine):
        state = c.attrs.get("State", {})
        rows.append(
            WorkerInfo(
                name=c.name or c.short_id,
                queue=c.labels.get(QUEUE_LABEL, "?"),
                status=str(state.get("Status", c.status)),
                health=str(state.get("Health", {}).get("Status", "-")),
                image=",".join(c.image.tags)
                if c.image and c.image.tags
                else str(c.attrs["Config"]["Image"]),
                managed=c.labels.get(MANAGED_LABEL) == MANAGER,
            )
        )
    return sorted(rows, key=lambda r: (r.queue, r.name))


def find_template(engine: DockerClient, queue: str, name: str | None) -> dict[str, Any] | None:
    """The configuration replicas copy: ``name``'s, else a compose worker's of ``queue``."""
    if name:
        try:
            return dict(engine.containers.get(name).attrs)
        except Exception as exc:
            raise WorkersError(f"no container {name!r} to copy the configuration of") from exc
    for c in _worker_containers(engine, queue):
        if c.labels.get(MANAGED_LABEL) != MANAGER:
            return dict(c.attrs)
    return None


def scale(
    engine: DockerClient,
    queue: str,
    replicas: int,
    *,
    prefix: str = "lodestar",
    template: str | None = None,
    image: str | None = None,
) -> tuple[list[str], list[str]]:
    """Run exactly ``replicas`` managed workers for ``queue``: (started, removed) names."""
    if replicas < 0:
        raise WorkersError("replicas must be >= 0")
    current = _managed(engine, queue, prefix)
    started: list[str] = []
    removed: list[str] = []
    for container in current[replicas:][::-1]:
        container.stop(timeout=STOP_TIMEOUT_S)
        container.remove()
        removed.append(container.name or container.short_id)
    running = current[:replicas]
    for container in running:
        if container.status != "running":
            container.start()
    if len(running) < replicas:
        attrs = find_template(engine, queue, template)
        if attrs is None and image is None:
            raise WorkersError(
                f"no {queue} worker to copy the configuration of: start the compose stack, "
                "or give --template NAME or --image"
            )
        used = {int(c.labels.get(REPLICA_LABEL, "0")) for c in running}
        index = 1
        while len(running) + len(started) < replicas:
            while index in used:
                index += 1
            spec = container_spec(queue, index, attrs, prefix=prefix, image=image)
            engine.containers.run(**spec)
            started.append(spec["name"])
            used.add(index)
    return started, removed


def logs(engine: DockerClient, names: list[str], queue: str | None, tail: int) -> str:
    containers = (
        [engine.containers.get(n) for n in names] if names else _worker_containers(engine, queue)
    )
    out: list[str] = []
    for c in containers:
        text = c.logs(tail=tail, timestamps=False).decode("utf-8", "replace")
        out.extend(f"{c.name} | {line}" for line in text.splitlines())
    return "\n".join(out)


# --- the CLI ------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace, settings: object) -> int:
    rows = list_workers(client())
    print(f"{'name':32} {'queue':5} {'status':10} {'health':10} {'managed':8} image")
    for r in rows:
        managed = "sdk" if r.managed else "compose"
        print(f"{r.name:32} {r.queue:5} {r.status:10} {r.health:10} {managed:8} {r.image}")
    return 0


def _cmd_scale(args: argparse.Namespace, settings: object) -> int:
    started, removed = scale(
        client(),
        args.queue,
        args.replicas,
        prefix=args.prefix,
        template=args.template,
        image=args.image,
    )
    for name in started:
        print(f"started {name}")
    for name in removed:
        print(f"removed {name}")
    print(f"{args.queue}: {args.replicas} managed replica(s)")
    return 0


def _cmd_logs(args: argparse.Namespace, settings: object) -> int:
    print(logs(client(), args.names, args.queue, args.tail))
    return 0


def _guarded(handler: Any) -> Any:
    def run(args: argparse.Namespace, settings: object) -> int:
        try:
            return int(handler(args, settings))
        except WorkersError as exc:
            print(f"lodestar workers: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub: Any) -> None:
    """Add ``workers list | scale | logs`` to the ``lodestar`` parser."""
    workers = sub.add_parser(
        "workers", help="worker containers through the Docker SDK"
    ).add_subparsers(dest="workers_command", required=True)
    workers.add_parser("list", help="every worker container, compose's and ours").set_defaults(
        handler=_guarded(_cmd_list)
    )
    scale_p = workers.add_parser("scale", help="run N worker replicas for a queue")
    scale_p.add_argument("--queue", choices=QUEUES, required=True)
    scale_p.add_argument("--replicas", type=int, required=True)
    scale_p.add_argument("--template", help="container whose configuration replicas copy")
    scale_p.add_argument("--image", help="image (default: the template's, else lodestar:<queue>)")
    scale_p.add_argument("--prefix", default="lodestar", help="replica names: PREFIX-replica-Q-N")
    scale_p.set_defaults(handler=_guarded(_cmd_scale))
    logs_p = workers.add_parser("logs", help="recent log lines of worker containers")
    logs_p.add_argument("names", nargs="*", help="containers (default: every worker)")
    logs_p.add_argument("--queue", choices=QUEUES)
    logs_p.add_argument("--tail", type=int, default=50)
    logs_p.set_defaults(handler=_guarded(_cmd_logs))
