# PathGuard: `make run` serves the bundled default model, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh Debian machine (root or sudo for apt).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision 0.29.1 from PyPI is built against torch 2.14.1; pip takes both from the local wheel cache
# where one is configured (this project's CI machines), else from PyPI.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUNDLE ?= models/default

.PHONY: run test lint format protos data tools image-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST, the bundled default dataset: Debian's package (kubectl for the deploy tests too).
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

tools:
	@command -v kubectl >/dev/null 2>&1 || { $(SUDO) apt-get update -q && { $(SUDO) apt-get install -y -q kubectl || $(SUDO) apt-get install -y -q kubernetes-client; }; }

run: $(STAMP)
	$(BIN)/pathguard serve --bundle $(BUNDLE)

test: $(STAMP) data tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy $(TYPED_API)
	$(BIN)/python -m pytest -q

# Build the container images (deploy/docker/Dockerfile, targets server and eval) with podman and check the server
# image end to end: KServe v2 screening of Fashion-MNIST, UID 10001, read-only root, SIGTERM drain under load.
# Needs root and takes minutes, so it is not part of `make test`. Writes reports/deploy/image-test.json.
image-test: $(STAMP) data
	$(SUDO) $(BIN)/python deploy/image_test.py $(IMAGE_TEST_ARGS)

# The public API of the two libraries: what the CLI, the benchmarks and users import.
TYPED_API := detector/__init__.py detector/bundle.py detector/screening.py detector/fitting.py \
	detector/detectors/base.py detector/detectors/record.py detector/attacks/registry.py \
	service/config.py service/client.py service/errors.py service/batching.py service/server.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy $(TYPED_API)

# Reformats the tree with ruff's formatter ([tool.ruff.format]); `make test` and `make lint` check it.
format: $(STAMP)
	$(BIN)/ruff format .

# Regenerate the gRPC code in service/_proto from protos/ (never edit the generated files).
protos: $(STAMP)
	$(BIN)/python -m service.codegen

clean:
	rm -rf $(VENV) .pytest_cache
