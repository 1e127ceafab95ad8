# Three commands on a fresh machine: `make run`, `make test` and `make lab`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export MPLBACKEND := Agg

.PHONY: run test lab sync-check nbdev-test pytest install install-dev export clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime install (what `make run` needs).
$(VENV)/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install --quiet -e .
	@touch $@

# Development install: nbdev 2.4 pin set + test stack, and a Jupyter kernel for papermill;
# asl-validator (npm, pinned by package-lock.json) into node_modules/ for the state machine check.
$(VENV)/.installed-dev: $(VENV)/.installed package.json package-lock.json
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	npm ci --no-audit --no-fund
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make run: the local end-to-end job on the bundled penguins data
run: $(VENV)/.installed
	$(BIN)/mlproj run

## make test: nbdev sync check, notebook tests, pytest
test: $(VENV)/.installed-dev sync-check nbdev-test pytest

sync-check: $(VENV)/.installed-dev
	@$(BIN)/nbdev_export && $(BIN)/nbdev_clean
	@if [ -n "$$(git status --porcelain -- nbs mlproj)" ]; then \
	  echo "nbdev sync check failed: nbdev_export/nbdev_clean changed these files; run them and commit:"; \
	  git status --porcelain -- nbs mlproj; exit 1; \
	else echo "nbdev sync check: notebooks and package agree"; fi

nbdev-test: $(VENV)/.installed-dev
	$(BIN)/nbdev_test --n_workers 2 --timing --flags aws

# --dist loadgroup: with the scheduler of tests/conftest.py, the tests of a module with costly module fixtures (ONE_WORKER) share a worker
pytest: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

## make lab: JupyterLab on 127.0.0.1 over the project, a sandbox /opt/ml filled from the newest run (LAB_ARGS='--port 0 --run <id> --raw <table>')
lab: $(VENV)/.installed-dev
	$(BIN)/python -m mlproj.lab $(LAB_ARGS)

## make export: regenerate mlproj/ from the notebooks and clean them
export: $(VENV)/.installed-dev
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

## make bench: every benchmark, each figure beside its reference from the same run (a few minutes; 10M rows: see README)
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_inference.py
	$(BIN)/python bench/bench_notebook.py
	$(BIN)/python bench/bench_small_files.py
	$(BIN)/python bench/bench_monitor.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_serve.py

clean:
	rm -rf $(VENV) build *.egg-info
