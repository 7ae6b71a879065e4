# The two commands of the README: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
INBOX ?= inbox
JSRT ?= ../shared/data/jsrt

.PHONY: setup run test lint test-all bench bench-gpu bench-qc bench-qc-uncertainty bench-storage bench-serve bench-web bench-import bench-dicom bench-uncertainty clean

setup:
	@bash scripts/setup.sh

## Set up, put the example chest X-rays in ./inbox and segment everything that lands there.
run: setup
	@$(PY) scripts/example_images.py $(INBOX)
	$(VENV)/bin/chexmask serve --inbox $(INBOX)

## Set up and run the default test suite (real Redis, PostgreSQL and moto servers; no slow tests).
test: setup
	$(VENV)/bin/pytest -m "not slow" -q

## Lint: ruff (rules and formatting), the one-way layering of imports, mypy.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_layers.py
	$(PY) scripts/typecheck.py

## Everything, the slow tests included.
test-all: setup
	$(VENV)/bin/pytest -q

## Segmentation throughput: pipelined `chexmask segment` against a naive loop, same run.
bench: setup
	$(PY) -m benchmarks.bench_segment

## GPU throughput and fidelity against a naive GPU loop (needs a CUDA device and torch build).
bench-gpu: setup
	$(PY) -m benchmarks.bench_gpu

bench-storage: setup
	$(PY) -m benchmarks.bench_storage --rows 1000000

## Web app: gallery and image page server time over 1,000,000 rows, round trips per grade.
bench-web: setup
	$(PY) -m benchmarks.bench_web --rows 1000000

## CheXmask import rows/s and a 1%-new scan of a 1,000,000-object listing, SQLite and PostgreSQL.
bench-import: setup
	$(PY) -m benchmarks.bench_import --rows 200000 --published-rows 20000 --objects 1000000

## Pipeline overhead: `chexmask serve` against `chexmask segment` on the same images.
bench-serve: setup
	$(PY) -m benchmarks.bench_serve

## QC CPU per image against segmentation's in serve (target <= 1), and the QC validation numbers.
bench-qc: setup
	nice -n 10 $(PY) -m benchmarks.bench_qc

## Does the landmark uncertainty (N = 20) add to Dice RCA in flagging bad masks? 20 held-out JSRT images,
## clean, OOD and degraded; cached per image in the output folder, so a second run only re-makes the report.
bench-qc-uncertainty: setup
	nice -n 10 $(VENV)/bin/chexmask qc uncertainty --images $(JSRT)/images --landmarks $(JSRT)/landmarks \
		--ids-file chexmask/weights/manifest.json --split validation_ids --samples 20 --out .chexmask/bench-qc-uncertainty

## DICOM C-STORE SCP instances/s against the disk's write speed; acknowledgement to segmentation (and SEG).
bench-dicom: setup
	nice -n 5 $(PY) -m benchmarks.bench_dicom

## Uncertainty (N = 20 latent samples) cost as a ratio of a segmentation on the CPU, same run (target <= 0.3).
bench-uncertainty: setup
	$(PY) -m benchmarks.bench_uncertainty

clean:
	rm -rf $(VENV) .chexmask .pytest_cache chexmask-out
