# leadsync — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
export LEADSYNC_HOME ?= $(CURDIR)/.leadsync

.PHONY: demo test lint unit integration bench soak fuzz venv clean lock cluster cluster-stop ui

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

# Installs the pinned lock (runtime + dev) and leadsync itself, editable.
# The stamp makes re-runs instant until a lock file changes.
# --compile-bytecode: uv does not write .pyc files (pip does), and with PYTHONDONTWRITEBYTECODE
# set nothing writes them later, so every task process would compile Airflow and Great
# Expectations from source (measured: `import great_expectations` 8.7 s without, 4.1 s with).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.txt -r requirements-dev.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/leadsync demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Benchmarks (figures vs a baseline in the same run); e.g. make bench BENCH_ARGS=--skip-e2e
bench: venv
	$(BIN)/leadsync bench $(BENCH_ARGS)

# 1,000+ random crash/fault schedules; prints the tally (lost, double-counted, time).
soak: venv
	$(BIN)/pytest tests/integration/test_faults.py -k random_fault_schedules \
		--schedules $${SCHEDULES:-1000} --timeout 0 -q -s -p no:cacheprovider

# Hostile rows (seeded) through the real DAG on SQLite and Postgres, and through render;
# prints the tally (rows, outcomes by reason, crashes, leaks). ROWS per run, SEEDS per backend.
fuzz: venv
	LEADSYNC_FUZZ_ROWS=$${ROWS:-10000} LEADSYNC_FUZZ_SEEDS=$${SEEDS:-2} \
	LEADSYNC_FUZZ_RENDER_LINES=$${LINES:-10000} \
		$(BIN)/pytest tests/integration/test_fuzz.py -k "hostile_rows or render" \
		--timeout 0 -q -s -p no:cacheprovider

# A local Airflow on the CeleryExecutor (API server, scheduler, dag-processor, triggerer, two
# Celery workers) on this machine's Postgres and Redis, plus the sandbox; detached. Idempotent.
# LEADSYNC_CLUSTER_PG / LEADSYNC_CLUSTER_REDIS override postgresql://postgres@127.0.0.1:5432
# and redis://127.0.0.1:6379/0.
cluster: venv
	$(BIN)/python -m leadsync.cluster start

# Stops exactly the processes `make cluster` started (its databases stay for the next start).
cluster-stop: venv
	$(BIN)/python -m leadsync.cluster stop

# The Airflow UI over the demo's own Airflow home (runs, logs), with the sandbox connections.
ui: venv
	$(BIN)/python -m leadsync.cluster ui

# Regenerates the locks from the short top-level lists (needs network to PyPI).
lock: | $(BIN)/python
	$(BIN)/uv pip compile requirements.in -o requirements.txt --python-version 3.11 -q
	$(BIN)/uv pip compile requirements-dev.in -o requirements-dev.txt --python-version 3.11 -q

clean:
	rm -rf $(VENV) .leadsync .pytest_cache .mypy_cache .ruff_cache
