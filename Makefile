# Two entry points (README): `make run` runs the pipeline on the sample data, `make test` runs the tests.
# Both create .venv and install what they need; a stamp file keeps the second call from reinstalling.
# `make test-integration` runs the tests marked `integration` (the production stack: PostgreSQL, an S3
# server, Prefect and MLflow servers, two workers; Debian's `postgresql` must be installed), which
# `make test` leaves out to stay within its time budget. .ci/run runs both.
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

# The page `dvc plots show` writes draws with Vega, Vega-Lite and vega-embed. DVC's default page loads
# them from a CDN (blank offline), so .dvc/config points DVC at $(PLOTS_TEMPLATE) instead: vega/plots-page.html
# with the three scripts inlined, which draws from file:// with no network wherever the page is written.
# Exact npm versions, and vega/SHA256SUMS refuses any other bytes (bump both together).
VEGA_PACKAGES := vega@6.4.0 vega-lite@6.5.0 vega-embed@7.3.0
VEGA_JS := vega.min.js vega-lite.min.js vega-embed.min.js
VEGA_BUILD := vega/build
PLOTS_TEMPLATE := $(VEGA_BUILD)/plots-page.html

.PHONY: run test test-integration install clean-outputs

install: $(STAMP) $(PLOTS_TEMPLATE)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exact pin: the CPU wheel on local disk, never a CUDA build from the index
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(PLOTS_TEMPLATE): vega/plots-page.html vega/SHA256SUMS Makefile
	@command -v npm >/dev/null || { echo "npm (node 20) is needed once, to fetch Vega for the offline plots page"; exit 1; }
	rm -rf $(VEGA_BUILD) && mkdir -p $(VEGA_BUILD)/npm
	cd $(VEGA_BUILD)/npm && npm pack --silent $(VEGA_PACKAGES) >/dev/null
	for tgz in $(VEGA_BUILD)/npm/*.tgz; do tar -xzf $$tgz -C $(VEGA_BUILD) --strip-components=2 --wildcards 'package/build/*.min.js' || exit 1; done
	rm -rf $(VEGA_BUILD)/npm
	cd $(VEGA_BUILD) && sha256sum --check --strict --quiet ../SHA256SUMS
	{ sed '/<!-- vega scripts -->/,$$d' vega/plots-page.html; \
	  for js in $(VEGA_JS); do echo "<script>/* $$js */"; cat $(VEGA_BUILD)/$$js; echo; echo '</script>'; done; \
	  sed '1,/<!-- vega scripts -->/d' vega/plots-page.html; } > $@.tmp
	mv $@.tmp $@

run: $(STAMP) $(PLOTS_TEMPLATE)
	$(BIN)/lmline run

# Lint and format first (seconds): a style slip fails before ten minutes of tests. The import layers
# are checked by tests/test_architecture.py, inside the suite. The ten slowest tests are listed at the
# end: the suite is meant to stay under 8 minutes on an idle 2-core machine, and they are where it goes.
# Two workers, one torch thread each: torch's spinning threads lose two thirds of their speed beside
# another busy process (bench/threads.py), and two workers are two busy processes. --dist loadfile
# keeps each module on one worker, in order: module fixtures are built once, and tests that build on
# the one before them (tests/test_flow.py) still follow it; tests/conftest.py's scheduler keeps the
# modules that look at the served run together too, so that ~100 s fixture is built once.
test: $(STAMP) $(PLOTS_TEMPLATE)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10 -m "not integration"

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

clean-outputs:
	rm -rf data models metrics plots checkpoints mlflow.db mlartifacts
