# The only two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-all quick bench lint format install clean docs

$(STAMP): setup.cfg pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rmib.demo --out demo-output

# Tests run in PYTEST_WORKERS processes (pytest-xdist; CI machines have 2 cores).
# --dist loadfile keeps a test file on one worker, so its module fixtures (tiny trained
# models) are built once; a session fixture is built at most once per worker.
# (loadgroup would also keep the users of the session's trained runs together, but with
# pytest 9.2 it silently stops grouping: pytest-dev/pytest-xdist#1386.)
# `pytest tests/some_test.py` alone, without -n, runs in this one process as before.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

# Every test, the integration and slow ones included.
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

test-all: test

# The developers' loop: everything but the integration and slow tests.
quick: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not integration and not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out benchmarks/BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check rmib tests benchmarks
	$(BIN)/ruff format --check rmib tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix rmib tests benchmarks
	$(BIN)/ruff format rmib tests benchmarks

docs: $(STAMP)
	COLUMNS=100 $(BIN)/python -c "from rmib.cli import reference_markdown; print(reference_markdown())" > docs/CLI.md

clean:
	rm -rf $(VENV) demo-output build *.egg-info
