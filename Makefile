# graphopt: the two commands are `make demo` (main job) and `make test` (lint, type check, test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lint test test-all bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m graphopt.demo --target arm

lint: setup
	$(PY) -m ruff check .
	$(PY) scripts/typecheck.py

test: setup lint
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) benchmarks/host_latency.py

clean:
	rm -rf build .pytest_cache
