# qmlmm: the README's commands. Every target sets up what it needs first (idempotent).
PY := .venv/bin/python
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test test-slow test-all lint bench clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/qmlmm demo

test: setup
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy

bench: setup
	$(PY) benchmarks/label_speed.py

clean:
	rm -rf demo_out .pytest_cache .mypy_cache .ruff_cache
