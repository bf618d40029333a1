# Two entry points (README): `make run` runs the pipeline on the sample data, `make test` runs the tests.
# Both create .venv and install what they need; a stamp file keeps the second call from reinstalling.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline: no telemetry or update checks from the libraries we drive.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: run test install clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exact pin: the CPU wheel on local disk, never a CUDA build from the index
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lmline run

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-outputs:
	rm -rf data models metrics plots checkpoints mlflow.db mlartifacts
