# The two commands of the README: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
INBOX ?= inbox

.PHONY: setup run test test-all bench bench-storage bench-serve bench-qc clean

setup:
	@bash scripts/setup.sh

## Set up, put the example chest X-rays in ./inbox and segment everything that lands there.
run: setup
	@$(PY) scripts/example_images.py $(INBOX)
	$(VENV)/bin/chexmask serve --inbox $(INBOX)

## Set up and run the default test suite (real Redis, PostgreSQL and moto servers; no slow tests).
test: setup
	$(VENV)/bin/pytest -m "not slow" -q

## Everything, the slow tests included.
test-all: setup
	$(VENV)/bin/pytest -q

## Segmentation throughput: pipelined `chexmask segment` against a naive loop, same run.
bench: setup
	$(PY) -m chexmask.worker.bench

bench-storage: setup
	$(PY) -m chexmask.storage.bench --rows 1000000

## Pipeline overhead: `chexmask serve` against `chexmask segment` on the same images.
bench-serve: setup
	$(PY) -m chexmask.ingest.bench

## QC CPU per image against segmentation's in serve (target <= 1), and the QC validation numbers.
bench-qc: setup
	nice -n 10 $(PY) benchmarks/bench_qc.py

clean:
	rm -rf $(VENV) .chexmask .pytest_cache chexmask-out
