"""Hold the deployment files to the code, without a Docker engine or a cluster.

docker-compose.yml, deploy/compose.gpu.yml, deploy/compose.hostnet.yml,
deploy/compose.localbase.yml and deploy/k8s/ name environment variables, ports,
modules, Dockerfiles and service hosts that must agree with ``shared.settings`` and with the
repository. Each test here fails when one of them drifts.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from lodestar.keys import SECRET_FILES, init_keys
from shared.settings import DEFAULT_PORTS, SECRETS_DIR_ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
COMPOSE_HOSTNET = ROOT / "deploy" / "compose.hostnet.yml"
COMPOSE_LOCALBASE = ROOT / "deploy" / "compose.localbase.yml"
COMPOSE_KEYS = ROOT / "deploy" / "compose.keys.yml"
#: deploy/compose.hostnet.yml shifts every port by this much (Redis 16379, PostgreSQL 15432).
HOSTNET_SHIFT = 10000
K8S = ROOT / "deploy" / "k8s"
#: The Secret every Lodestar pod mounts its API key files from (deploy/README.md, "API keys").
KEYS_SECRET = "lodestar-api-keys"
#: The API version the manifests are checked against (kubernetes-validate bundles its schema).
KUBERNETES_VERSION = "1.37.0"
DOCKERFILES = (ROOT / "deploy" / "Dockerfile.cpu", ROOT / "deploy" / "Dockerfile.gpu")

REQUIRED_SERVICES = {"redis", "postgres", "index", "orchestrator", "worker-cpu", "worker-gpu"}
SETTINGS_VARS = {f"LODESTAR_{name.upper()}" for name in Settings.model_fields}
#: Variables a deployment may set besides settings fields: where the key files are mounted.
KNOWN_VARS = SETTINGS_VARS | {SECRETS_DIR_ENV}
#: Settings that come from the mounted key files; an environment variable would shadow the file.
KEY_VARS = {name.upper() for name in SECRET_FILES}
LODESTAR_VAR = re.compile(r"\bLODESTAR_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's ``!reset`` tag (an override clearing a key of the base file)."""


RESET = object()
ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as it resolves with none of the variables set."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


COMPOSE_DOC: dict[str, Any] = load_yaml(COMPOSE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE_DOC["services"]
GPU_SERVICES: dict[str, dict[str, Any]] = load_yaml(COMPOSE_GPU)["services"]
K8S_FILES = sorted(K8S.rglob("*.yaml"))
#: Strategic-merge patches an overlay applies (partial documents: checked apart).
K8S_PATCHES = {
    (kustomization.parent / patch["path"]).resolve()
    for kustomization in K8S.rglob("kustomization.yaml")
    for patch in load_yaml(kustomization).get("patches", [])
}
K8S_DOCS: list[dict[str, Any]] = [
    doc
    for path in K8S_FILES
    if path.resolve() not in K8S_PATCHES
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in K8S_DOCS if doc.get("kind") == kind]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate("" if v is None else str(v)) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def python_module(command: list[str]) -> str | None:
    """``X`` of ``python -m X ...``, else None."""
    if len(command) >= 3 and Path(command[0]).name.startswith("python") and command[1] == "-m":
        return command[2]
    return None


def lodestar_service(command: list[str]) -> str | None:
    """``X`` of ``python -m services.X`` when X is an HTTP service with a port in settings."""
    module = python_module(command)
    if module and module.startswith("services."):
        name = module.split(".")[1]
        return name if name in DEFAULT_PORTS else None
    return None


def expected_port(name: str, env: dict[str, str]) -> int:
    return int(env.get(f"LODESTAR_{name.upper()}_PORT") or DEFAULT_PORTS[name])


def container_ports(service: dict[str, Any]) -> list[int]:
    """Container-side ports of ``ports`` (short or long syntax) and ``expose``."""
    ports = []
    for entry in [*service.get("ports", []), *service.get("expose", [])]:
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(interpolate(str(entry)).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def module_exists(module: str) -> bool:
    path = ROOT / module.replace(".", "/")
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def k8s_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in K8S_DOCS:
        if doc.get("kind") in {"Deployment", "StatefulSet", "Job"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The variables a container sees: its envFrom ConfigMaps and Secrets, then its env."""
    sources = {(d["kind"], d["metadata"]["name"]): d for d in K8S_DOCS if "metadata" in d}
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(sources[("ConfigMap", ref["configMapRef"]["name"])].get("data", {}))
        if "secretRef" in ref:
            env.update(sources[("Secret", ref["secretRef"]["name"])].get("stringData", {}))
    env.update({e["name"]: str(e.get("value", "")) for e in container.get("env", [])})
    return {k: str(v) for k, v in env.items()}


def all_commands() -> list[list[str]]:
    commands = [command_of(s) for s in [*SERVICES.values(), *GPU_SERVICES.values()]]
    commands += [c.get("command", []) + c.get("args", []) for _, c in k8s_containers()]
    return [c for c in commands if c]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as a container with this environment would build them."""
    for key in [k for k in os.environ if k.startswith("LODESTAR_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("LODESTAR_"):
            monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


# --- compose ------------------------------------------------------------------------------------


def test_compose_has_every_required_service() -> None:
    missing = REQUIRED_SERVICES - SERVICES.keys()
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"
    assert set(GPU_SERVICES) <= SERVICES.keys(), "the GPU override only modifies services"


@pytest.mark.parametrize(
    "path",
    [
        COMPOSE,
        COMPOSE_GPU,
        COMPOSE_HOSTNET,
        COMPOSE_LOCALBASE,
        COMPOSE_KEYS,
        *K8S_FILES,
        *DOCKERFILES,
    ],
    ids=lambda p: p.name,
)
def test_every_lodestar_variable_is_a_settings_field(path: Path) -> None:
    unknown = set(LODESTAR_VAR.findall(path.read_text())) - KNOWN_VARS
    assert not unknown, f"{path.name} uses variables Settings does not read: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_environment_loads_into_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**env_of(SERVICES[name]), **env_of(GPU_SERVICES.get(name, {}))}
    if any(key.startswith("LODESTAR_") for key in env):
        settings = settings_from(env, monkeypatch)
        assert settings.host == "0.0.0.0", "services in containers must bind every interface"
        assert str(settings.data_dir) == "/data"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_ports_and_healthchecks_match_settings(name: str) -> None:
    service = SERVICES[name]
    command = command_of(service)
    svc = lodestar_service(command)
    if python_module(command) == "services.worker":
        # No HTTP: the worker answers a Celery ping under the name it registers with.
        code = service["healthcheck"]["test"][-1]
        compile(code, f"{name} healthcheck", "exec")
        assert f"'lodestar-{command[command.index('--queues') + 1]}@'" in code
    if svc is None:
        assert not any(8000 <= p <= 8006 for p in container_ports(service))
        return
    port = expected_port(svc, env_of(service))
    assert all(p == port for p in container_ports(service)), (name, container_ports(service))
    test = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in test
    code = service["healthcheck"]["test"][-1]
    compile(code, f"{name} healthcheck", "exec")


def test_orchestrator_is_published() -> None:
    port = expected_port("orchestrator", env_of(SERVICES["orchestrator"]))
    assert port in container_ports(SERVICES["orchestrator"])
    published = {name for name, s in SERVICES.items() if s.get("ports")}
    assert published <= {"orchestrator", "index"}, "only the entry point (and index) publish"


@pytest.mark.parametrize(
    "module", sorted({m for c in all_commands() if (m := python_module(c))}), ids=str
)
def test_python_module_commands_exist(module: str) -> None:
    assert module_exists(module), f"`python -m {module}`: no {module.replace('.', '/')} module"


def test_console_script_commands_exist() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    used = {c[0] for c in all_commands() if python_module(c) is None and "/" not in c[0]}
    used -= {"redis-server", "pg_isready", "redis-cli"}
    assert used <= scripts.keys(), f"commands that are not console scripts: {used - scripts.keys()}"
    for name in used:
        module, _, func = scripts[name].partition(":")
        path = ROOT / module.replace(".", "/")
        source = (
            path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        )
        assert source.is_file(), f"console script {name} -> {module}: module missing"
        defined = {
            node.name
            for node in ast.parse(source.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert func in defined, f"console script {name}: {module} defines no {func}()"


@pytest.mark.parametrize(
    "service",
    [*SERVICES.values(), *GPU_SERVICES.values()],
    ids=[*SERVICES, *(f"gpu-{n}" for n in GPU_SERVICES)],
)
def test_build_context_and_dockerfile_exist(service: dict[str, Any]) -> None:
    build = service.get("build")
    if build is None:
        assert "image" in service
        return
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    assert context.is_dir()
    if isinstance(build, dict) and "dockerfile" in build:
        assert (context / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_targets_exist_with_the_condition_they_promise(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    if isinstance(depends, list):
        depends = {target: {"condition": "service_started"} for target in depends}
    for target, spec in depends.items():
        assert target in SERVICES, f"{name} depends on unknown service {target}"
        assert "gpu" not in SERVICES[target].get("profiles", []), "a profile-only dependency"
        condition = spec.get("condition", "service_started")
        if condition == "service_healthy":
            healthcheck = SERVICES[target].get("healthcheck") or {}
            assert healthcheck.get("test") and not healthcheck.get("disable")
        elif condition == "service_completed_successfully":
            assert SERVICES[target].get("restart", "no") == "no", f"{target} is not one-shot"


def test_compose_index_url_names_the_index_service() -> None:
    index_port = expected_port("index", env_of(SERVICES["index"]))
    for name, service in SERVICES.items():
        url = env_of(service).get("LODESTAR_INDEX_URL")
        if url:
            parts = urlsplit(url)
            assert (parts.hostname, parts.port) == ("index", index_port), (name, url)


def test_compose_service_urls_name_compose_services() -> None:
    """Index, broker, result backend and database hosts are services of this compose file."""
    for service in SERVICES.values():
        for key, value in env_of(service).items():
            if key.startswith("LODESTAR_") and "://" in value:
                host = urlsplit(value).hostname
                assert host in SERVICES, f"{key}={value}: no service {host}"


def test_lodestar_services_share_the_data_volume() -> None:
    for name, service in SERVICES.items():
        env = env_of(service)
        if "LODESTAR_DATA_DIR" in env:
            mounts = [
                v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                for v in service.get("volumes", [])
            ]
            assert f"lodestar-data:{env['LODESTAR_DATA_DIR']}" in mounts, name
    assert "lodestar-data" in COMPOSE_DOC["volumes"]


def test_gpu_worker_runs_the_gpu_queue_on_an_nvidia_device() -> None:
    worker = SERVICES["worker-gpu"]
    assert "gpu" in worker["profiles"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    assert command_of(worker)[-2:] == ["--queues", "gpu"]
    assert command_of(SERVICES["worker-cpu"])[-2:] == ["--queues", "cpu"]
    assert env_of(worker)["LODESTAR_DEVICE"] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


# --- deploy/compose.hostnet.yml: host networking, ports shifted, nothing else changed ----------

HOSTNET: dict[str, dict[str, Any]] = load_yaml(COMPOSE_HOSTNET)["services"]
LOCALBASE: dict[str, dict[str, Any]] = load_yaml(COMPOSE_LOCALBASE)["services"]
HOSTNET_PORTS = {name: port + HOSTNET_SHIFT for name, port in DEFAULT_PORTS.items()}


def test_hostnet_puts_every_service_on_the_host_network() -> None:
    assert set(HOSTNET) == set(SERVICES), "every service, none invented"
    for name, service in HOSTNET.items():
        assert service["network_mode"] == "host", name
        assert "networks" not in service, name
        if name in ("redis", "postgres"):
            continue
        for key in ("ports", "expose"):
            if key in SERVICES[name]:
                assert service.get(key) is RESET, (
                    f"{name}: {key} must be !reset on the host network"
                )
    assert "networks" not in load_yaml(COMPOSE_HOSTNET)
    assert "networks" not in COMPOSE_DOC, "a network of the base file would get a bridge"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_hostnet_changes_only_addresses(name: str) -> None:
    allowed = {"network_mode", "ports", "expose", "environment", "healthcheck", "hostname"}
    if name == "redis":
        allowed.add("command")
    if name == "postgres":
        allowed.add("command")
    assert set(HOSTNET[name]) <= allowed, f"{name}: {set(HOSTNET[name]) - allowed}"
    env = env_of(HOSTNET[name])
    for key, value in env.items():
        assert key.startswith("LODESTAR_") or key == "PGPORT", f"{name}: {key}"
        assert key in env_of(SERVICES[name]) or key.endswith("_PORT") or key == "PGPORT", (
            f"{name}: {key} is not in docker-compose.yml's environment"
        )
        if "://" in value:
            assert urlsplit(value).hostname == "127.0.0.1", f"{name}: {key}={value}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_hostnet_environment_loads_into_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**env_of(SERVICES[name]), **env_of(HOSTNET[name])}
    if not any(key.startswith("LODESTAR_") for key in env):
        return
    settings = settings_from(env, monkeypatch)
    assert settings.host == "127.0.0.1", "on the host network services bind loopback only"
    for service, port in HOSTNET_PORTS.items():
        assert settings.port_of(service) == port, service
    urls = {
        "index": settings.index_url,
        "reranker": settings.reranker_url,
        "critic": settings.critic_url,
        "dsi": settings.dsi_url,
        "fmindex": settings.fmindex_url,
        "generator": settings.generator_url,
    }
    for service, url in urls.items():
        assert (urlsplit(url).hostname, urlsplit(url).port) == ("127.0.0.1", HOSTNET_PORTS[service])
    assert urlsplit(settings.broker_url).port == 6379 + HOSTNET_SHIFT
    assert urlsplit(settings.result_backend).port == 6379 + HOSTNET_SHIFT
    assert urlsplit(settings.database_url).port == 5432 + HOSTNET_SHIFT


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_hostnet_healthchecks_are_the_base_ones_on_the_shifted_port(name: str) -> None:
    base = SERVICES[name].get("healthcheck", {}).get("test")
    override = HOSTNET[name].get("healthcheck", {}).get("test")
    svc = lodestar_service(command_of(SERVICES[name]))
    if name == "redis":
        assert override == ["CMD", "redis-cli", "-p", str(6379 + HOSTNET_SHIFT), "ping"]
        assert f"--port {6379 + HOSTNET_SHIFT}" in " ".join(command_of(HOSTNET[name]))
        assert command_of(HOSTNET[name])[: len(command_of(SERVICES[name]))] == command_of(
            SERVICES[name]
        ), "the base command, with port and bind added"
    elif name == "postgres":
        assert override is None, "pg_isready follows PGPORT: the base check unchanged"
        assert env_of(HOSTNET[name])["PGPORT"] == str(5432 + HOSTNET_SHIFT)
    elif svc is not None:
        port = DEFAULT_PORTS[svc]
        assert override == [
            part.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{port + HOSTNET_SHIFT}/")
            for part in base
        ]
    else:
        assert override is None, f"{name}: no port in its check, so no change"


def test_hostnet_workers_have_their_own_host_names() -> None:
    """On the host network a container would otherwise take the machine's name: the health
    check pings lodestar-<queue>@<hostname>, so each worker needs a name of its own."""
    names = [HOSTNET[n]["hostname"] for n in SERVICES if n.startswith("worker-")]
    assert len(names) == len(set(names)) == 2


def test_localbase_changes_only_images_and_builds() -> None:
    assert set(LOCALBASE) <= set(SERVICES)
    for name, service in LOCALBASE.items():
        assert set(service) <= {"image", "build"}, name
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        assert "lodestar/debian:bookworm" in build["args"]["BASE_IMAGE"]
        if name not in ("redis", "postgres"):
            assert "image" not in service, f"{name}: the same lodestar image as the base file"
            assert build["dockerfile"] == SERVICES[name]["build"]["dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_take_a_base_image_and_run_unprivileged(path: Path) -> None:
    text = path.read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "--no-index" in text, "dependencies from the wheelhouse only"


def test_dockerfile_torch_pin_matches_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(d.split("==")[1] for d in deps if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch}\n" in DOCKERFILES[0].read_text()


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "var", ".env", "deploy/secrets"} <= ignored


def _compose_cli() -> list[str] | None:
    """A Compose v2 CLI (`docker compose` or `docker-compose`); `config` needs no engine."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cli in candidates:
        if shutil.which(cli[0]) is None:
            continue
        probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            return cli
    return None


def test_docker_compose_config_accepts_the_files(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI installed: `docker compose config` not run")
    combinations = (
        ["-f", str(COMPOSE)],
        ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)],
        ["-f", str(COMPOSE), "-f", str(COMPOSE_HOSTNET)],
        ["-f", str(COMPOSE), "-f", str(COMPOSE_HOSTNET), "-f", str(COMPOSE_LOCALBASE)],
        ["-f", str(COMPOSE), "-f", str(COMPOSE_HOSTNET), "-f", str(COMPOSE_KEYS)],
    )
    init_keys(tmp_path)
    for files in combinations:
        result = subprocess.run(
            [*cli, *files, "--profile", "gpu", "config", "--quiet"],
            # Compose checks that the secret files exist; deploy/secrets is not committed.
            env={**os.environ, SECRETS_DIR_ENV: str(tmp_path)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_keys_override_mounts_the_key_files_on_every_lodestar_service() -> None:
    keys = load_yaml(COMPOSE_KEYS)
    assert set(keys["secrets"]) == set(SECRET_FILES)
    for name, secret in keys["secrets"].items():
        assert secret["file"].endswith(f"}}/{name}"), "the file is named like the secret"
    lodestar = {
        name for name, service in SERVICES.items() if "LODESTAR_DATA_DIR" in env_of(service)
    }
    assert set(keys["services"]) == lodestar
    for name in lodestar:
        service = keys["services"][name]
        assert service["secrets"] == list(SECRET_FILES), name
        # Production refuses to start without admin key digests: a missing file fails closed.
        assert service["environment"]["LODESTAR_ENV"] == "production", name


def test_no_deployment_file_sets_a_key_variable() -> None:
    """Keys travel as files (compose secrets, a Kubernetes Secret volume): an environment
    variable of the same name, even an empty one, would win over the file."""
    overrides = [COMPOSE_GPU, COMPOSE_HOSTNET, COMPOSE_LOCALBASE, COMPOSE_KEYS]
    services = [
        *SERVICES.values(),
        *(s for f in overrides for s in load_yaml(f)["services"].values()),
    ]
    for service in services:
        assert not KEY_VARS & env_of(service).keys()
    for _, container in k8s_containers():
        assert not KEY_VARS & k8s_env(container).keys(), container["name"]


# --- kubernetes ---------------------------------------------------------------------------------


def test_kustomizations_list_every_manifest() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        config = load_yaml(kustomization)
        resources = config["resources"] + [p["path"] for p in config.get("patches", [])]
        for resource in resources:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"
        listed = {(kustomization.parent / r).resolve() for r in resources}
        for manifest in kustomization.parent.glob("*.yaml"):
            assert manifest.name == "kustomization.yaml" or manifest.resolve() in listed


def test_k8s_references_exist() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in K8S_DOCS if "metadata" in d}
    for doc, container in k8s_containers():
        for ref in container.get("envFrom", []):
            if "configMapRef" in ref:
                assert ("ConfigMap", ref["configMapRef"]["name"]) in names
            if "secretRef" in ref:
                assert ("Secret", ref["secretRef"]["name"]) in names
        for volume in doc["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names


@pytest.mark.parametrize(
    "container", [c for _, c in k8s_containers()], ids=[c["name"] for _, c in k8s_containers()]
)
def test_k8s_environment_loads_into_settings(
    container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = k8s_env(container)
    lodestar_vars = {key for key in env if key.startswith("LODESTAR_")}
    if not container["image"].startswith("lodestar:"):
        assert not lodestar_vars, f"{container['name']} is given Lodestar settings"
        return
    assert lodestar_vars <= KNOWN_VARS
    settings = settings_from(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.database_url and settings.broker_url


def _k8s_services() -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    return [
        (doc, c, svc)
        for doc, c in k8s_containers()
        if (svc := lodestar_service(c.get("command", []) + c.get("args", [])))
    ]


@pytest.mark.parametrize(
    ("doc", "container", "svc"), _k8s_services(), ids=[svc for _, _, svc in _k8s_services()]
)
def test_k8s_ports_probes_and_service_match_settings(
    doc: dict[str, Any], container: dict[str, Any], svc: str
) -> None:
    port = expected_port(svc, k8s_env(container))
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert list(named.values()) == [port], (svc, named)

    def probe_port(probe: dict[str, Any]) -> int:
        ref = probe["httpGet"]["port"]
        return int(named[ref] if isinstance(ref, str) else ref)

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probe_port(container["readinessProbe"]) == port
    assert probe_port(container["livenessProbe"]) == port

    labels = doc["spec"]["template"]["metadata"]["labels"]
    services = [s for s in k8s_kind("Service") if s["spec"]["selector"].items() <= labels.items()]
    assert services, f"no Service selects the {svc} pods"
    for service in services:
        for p in service["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert (named[target] if isinstance(target, str) else target) == port
            assert p["port"] == port, "Service port differs from the one clients are told"


def test_k8s_index_url_names_the_index_service() -> None:
    index = next(c for _, c, svc in _k8s_services() if svc == "index")
    index_port = expected_port("index", k8s_env(index))
    services = {s["metadata"]["name"]: s for s in k8s_kind("Service")}
    for _, container in k8s_containers():
        url = k8s_env(container).get("LODESTAR_INDEX_URL")
        if url:
            parts = urlsplit(url)
            assert parts.hostname in services, url
            assert parts.port == index_port
            ports = [p["port"] for p in services[parts.hostname]["spec"]["ports"]]
            assert index_port in ports


def test_gpu_overlay_runs_vllm_as_the_generator_on_an_nvidia_gpu() -> None:
    (patch_path,) = [p for p in K8S_PATCHES if p.name == "generator-vllm.yaml"]
    patch = load_yaml(patch_path)
    (base,) = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == "generator"]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]
    assert container["command"][:2] == ["/opt/vllm/bin/vllm", "serve"]
    assert container["command"][container["command"].index("--port") + 1] == "8007"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    compose = GPU_SERVICES["generator"]
    assert compose["command"][:2] == ["/opt/vllm/bin/vllm", "serve"]
    assert compose["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_k8s_lodestar_containers_mount_the_api_keys_secret() -> None:
    for doc, container in k8s_containers():
        if not container["image"].startswith("lodestar:"):
            continue
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        keyed = [
            n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == KEYS_SECRET
        ]
        assert len(keyed) == 1 and keyed[0] in mounts, container["name"]
        mount = mounts[keyed[0]]
        assert mount["mountPath"] == k8s_env(container)[SECRETS_DIR_ENV], container["name"]
        assert mount.get("readOnly") is True
        # No Secret means no keys (development); LODESTAR_ENV=production then refuses to start.
        assert volumes[keyed[0]]["secret"].get("optional") is True


def _merged(base: Any, patch: Any) -> Any:
    """A strategic-merge patch applied the way kustomize does for these files: mappings merge,
    lists of named items merge by name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {k: _merged(base[k], v) if k in base else v for k, v in patch.items()} | {
            k: v for k, v in base.items() if k not in patch
        }
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in [*base, *patch])
    ):
        by_name = {i["name"]: i for i in base}
        for item in patch:
            by_name[item["name"]] = _merged(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


def _k8s_resources() -> list[tuple[str, dict[str, Any]]]:
    resources = [
        (f"{d['kind']}/{d['metadata']['name']}", d)
        for d in K8S_DOCS
        if d["kind"] != "Kustomization"
    ]
    for path in sorted(K8S_PATCHES):
        patch = load_yaml(path)
        (base,) = [
            d for d in k8s_kind(patch["kind"]) if d["metadata"]["name"] == patch["metadata"]["name"]
        ]
        resources.append(
            (f"{path.name} over {patch['kind']}/{patch['metadata']['name']}", _merged(base, patch))
        )
    return resources


@pytest.mark.parametrize(
    "resource", [r for _, r in _k8s_resources()], ids=[name for name, _ in _k8s_resources()]
)
def test_k8s_manifests_are_valid_kubernetes_objects(resource: dict[str, Any]) -> None:
    """Each manifest (and each overlay patch applied to its base) against the Kubernetes API's
    own schema, strictly (no unknown fields), without a cluster."""
    import kubernetes_validate

    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
