# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.metaopt-installed

.PHONY: run test test-fast bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default (local Kubeflow runner, local MLflow on ./mlflow.db):
# all three pipelines end to end with the demo configs shortened to fit a few minutes on 2 cores
# (`--preset demo` runs them as written: about 35 minutes here).
run: $(STAMP)
	$(BIN)/metaopt run all --local --preset quick

# The whole suite, slow end-to-end tests included (CI runs exactly this).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the slow end-to-end tests, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	for script in bench/*.py; do $(BIN)/python $$script --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
