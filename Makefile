# sandvm: `make setup` installs everything (idempotent); `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test lint typecheck unit soak bench clean

setup: $(BIN)/sandvm
	$(BIN)/sandvm setup

$(BIN)/sandvm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/sandvm

lint:
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports --no-logo
	$(BIN)/python tools/check_private.py --quiet

typecheck:
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

unit:
	$(BIN)/pytest -q -m "not qemu"

# the SIGKILL chaos test, nightly-sized (`make test` runs one round per operation)
SANDVM_CHAOS_ROUNDS ?= 120
soak:
	SANDVM_CHAOS_ROUNDS=$(SANDVM_CHAOS_ROUNDS) $(BIN)/pytest -q -s tests/test_runtime_manager.py -k sigkill_at_random_points

bench:
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
