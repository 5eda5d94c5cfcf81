# qmlmm: the README's commands. Every target sets up what it needs first (idempotent).
PY := .venv/bin/python
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test test-slow test-examples test-all lint bench bench-label bench-dftb bench-model bench-md bench-accuracy clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/qmlmm demo

test: setup
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

# the tiny seed studies end to end, a separate CI target (.ci/examples); measured on 2 cores with other
# jobs beside them: retinoic acid 11 min, SAM + cytosine 32 min
test-examples: setup
	$(PY) -m pytest -m examples -q

test-all: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy

# benchmarks write tables to benchmarks/results/ (bench-label and bench-accuracy take an hour or more)
bench: bench-dftb bench-model bench-md

bench-label: setup
	$(PY) benchmarks/label_speed.py --frames 4

bench-dftb: setup
	$(PY) benchmarks/dftb_speed.py --threads 1 --out dftb_speed_1thread
	$(PY) benchmarks/dftb_speed.py --threads 2

bench-model: setup
	$(PY) benchmarks/model_speed.py

bench-md: setup
	$(PY) benchmarks/md_speed.py

bench-accuracy: setup
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf demo_out runs .pytest_cache .mypy_cache .ruff_cache
