"""``lodestar keys init DIR``: the API keys of a deployment, as the secret files it mounts.

Every Lodestar process reads file secrets from ``/run/secrets`` (``shared.settings.load_settings``),
where compose ``secrets:`` (``deploy/compose.keys.yml``) and a Kubernetes Secret volume
(``deploy/k8s/base``, Secret ``lodestar-api-keys``) put them. This command writes the three files
those mounts expect, so a keyed stack is one command away:

- ``lodestar_service_api_key``: the key each service presents to the others (an admin key);
- ``lodestar_api_key_hashes``: SHA-256 digests of the admin keys, the service key among them;
- ``lodestar_read_api_key_hashes``: digests of the read-only keys.

The keys people use (``admin.key``, ``read.key``) are written beside them, readable by the owner
only, and are not mounted anywhere: only their digests travel.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from shared.settings import Settings, hash_api_key

#: Mounted secret files (named like the settings they set, ``shared.settings.load_settings``).
SERVICE_KEY_FILE = "lodestar_service_api_key"
ADMIN_HASHES_FILE = "lodestar_api_key_hashes"
READ_HASHES_FILE = "lodestar_read_api_key_hashes"
SECRET_FILES = (SERVICE_KEY_FILE, ADMIN_HASHES_FILE, READ_HASHES_FILE)
#: The keys handed to people; never mounted.
ADMIN_KEY_FILE = "admin.key"
READ_KEY_FILE = "read.key"


def new_key(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)  # O_CREAT's mode is masked by the umask


def init_keys(directory: Path, *, force: bool = False) -> None:
    """Write a fresh set of keys into ``directory``.

    The mounted files are world-readable (the containers run as uid 10001, and compose bind-mounts
    file secrets with the host's permissions); the folder itself is the owner's only, which is what
    keeps them from other users on the host.
    """
    targets = [*SECRET_FILES, ADMIN_KEY_FILE, READ_KEY_FILE]
    existing = [name for name in targets if (directory / name).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{directory} already holds {', '.join(existing)}: pass --force to replace the keys "
            "(every client and service must then get the new ones)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    service, admin, read = new_key("svc"), new_key("admin"), new_key("read")
    _write(directory / SERVICE_KEY_FILE, service + "\n", 0o644)
    _write(directory / ADMIN_HASHES_FILE, f"{hash_api_key(admin)},{hash_api_key(service)}\n", 0o644)
    _write(directory / READ_HASHES_FILE, hash_api_key(read) + "\n", 0o644)
    _write(directory / ADMIN_KEY_FILE, admin + "\n", 0o600)
    _write(directory / READ_KEY_FILE, read + "\n", 0o600)


def cmd_keys_init(args: argparse.Namespace, settings: Settings) -> int:
    del settings
    directory = Path(args.dir)
    try:
        init_keys(directory, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {', '.join(SECRET_FILES)} to {directory} (mounted as /run/secrets/...)")
    print(f"admin key: {directory / ADMIN_KEY_FILE}; read-only key: {directory / READ_KEY_FILE}")
    print("send one as Authorization: Bearer KEY (or X-API-Key: KEY)")
    return 0


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys of a deployment").add_subparsers(
        dest="keys_command", required=True
    )
    init = keys.add_parser(
        "init", help="write a service key and admin/read keys as the secret files a stack mounts"
    )
    init.add_argument("dir", nargs="?", default="deploy/secrets", help="default: deploy/secrets")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(handler=cmd_keys_init)
