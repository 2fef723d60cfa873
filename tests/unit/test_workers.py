"""lodestar/workers.py without an engine: what a replica is created with.

The engine-side behaviour (replicas that start, consume the cpu queue and go away) is in
tests/integration/test_compose_stack.py::test_worker_replicas_scaled_through_the_docker_sdk.
"""

from __future__ import annotations

from typing import Any

import pytest

from lodestar import workers
from lodestar.cli import build_parser

#: The parts of `docker inspect` of a compose worker a replica copies.
TEMPLATE: dict[str, Any] = {
    "Config": {
        "Image": "lodestar:cpu",
        "Env": ["LODESTAR_BROKER_URL=redis://127.0.0.1:16379/0", "LODESTAR_DATA_DIR=/data"],
        "User": "10001:10001",
        "WorkingDir": "/app",
        "Hostname": "worker-cpu",
    },
    "HostConfig": {"NetworkMode": "host"},
    "Mounts": [
        {"Type": "volume", "Name": "lodestar_lodestar-data", "Destination": "/data", "RW": True},
        {"Type": "bind", "Source": "/srv/x", "Destination": "/x", "RW": False},
    ],
}


def test_a_replica_copies_the_template_and_gets_a_name_of_its_own() -> None:
    spec = workers.container_spec("cpu", 2, TEMPLATE, prefix="lodestar", image=None)
    assert spec["name"] == spec["hostname"] == "lodestar-replica-cpu-2"
    assert spec["image"] == "lodestar:cpu"
    assert spec["command"] == ["python", "-m", "services.worker", "--queues", "cpu"]
    assert spec["environment"] == TEMPLATE["Config"]["Env"]
    assert spec["network_mode"] == "host"
    assert spec["user"] == "10001:10001"
    assert spec["volumes"] == ["lodestar_lodestar-data:/data:rw", "/srv/x:/x:ro"]
    assert spec["labels"][workers.MANAGED_LABEL] == workers.MANAGER
    assert spec["labels"][workers.QUEUE_LABEL] == "cpu"
    assert "device_requests" not in spec


def test_a_gpu_replica_requests_nvidia_devices() -> None:
    spec = workers.container_spec("gpu", 1, None, prefix="p", image=None)
    assert spec["image"] == "lodestar:gpu"
    assert spec["command"][-1] == "gpu"
    (request,) = spec["device_requests"]
    assert request["Capabilities"] == [["gpu"]]
    assert request["Count"] == -1


def test_an_unknown_queue_is_refused() -> None:
    with pytest.raises(workers.WorkersError):
        workers.container_spec("tpu", 1, None, prefix="p", image=None)


def test_the_cli_parses_every_workers_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["workers", "scale", "--queue", "cpu", "--replicas", "2"])
    assert (args.queue, args.replicas, args.prefix) == ("cpu", 2, "lodestar")
    assert parser.parse_args(["workers", "list"]).workers_command == "list"
    logs = parser.parse_args(["workers", "logs", "--queue", "gpu", "--tail", "5"])
    assert (logs.queue, logs.tail, logs.names) == ("gpu", 5, [])
    with pytest.raises(SystemExit):
        parser.parse_args(["workers", "scale", "--queue", "tpu", "--replicas", "1"])
