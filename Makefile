# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.metaopt-installed

.PHONY: run test test-fast lint bench clean venv image constraints

venv: $(STAMP)

# One command installs both distributions: the library metaopt-core (the root project, what a
# downstream job installs and registered models pin) and the pipeline app (app/: components,
# pipelines, the `metaopt` CLI). An older checkout installed them as one "metaopt": removed first.
$(STAMP): pyproject.toml app/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes metaopt 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e ".[test]" -e ./app
	touch $(STAMP)

# The main job on the embedded default (local Kubeflow runner, local MLflow on ./mlflow.db):
# all four pipelines end to end with the demo configs shortened (`--preset quick`); how long that
# takes on 2 cores (about 6 minutes, quiet) is measured in docs/benchmarks.md (`--preset demo` runs them as written).
run: $(STAMP)
	$(BIN)/metaopt run all --local --preset quick

# Lint and format check, then the whole suite, slow end-to-end tests included (CI runs exactly this).
# Two pytest workers (pytest-xdist): the end-to-end tests wait on step subprocesses and servers
# much of the time, so two share 2 cores well (13.5 min against about 20 serially); each worker
# starts its own MLflow, PostgreSQL and S3 servers. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything but the slow end-to-end tests, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The CPU and CUDA images, tagged <version>-<commit> (what compiled pipelines use by default), with
# docker or podman; where neither engine runs this says so and fails. IMAGE_ARGS: e.g. --push.
image: $(STAMP)
	$(BIN)/python -m pipelines.image_build $(IMAGE_ARGS)

# Re-pin the image's dependencies (constraints.txt) to what this environment has installed.
constraints: $(STAMP)
	$(BIN)/python -m pipelines.constraints > constraints.txt

bench: $(STAMP)
	for script in bench/*.py; do $(BIN)/python $$script --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
