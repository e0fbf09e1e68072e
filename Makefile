# Set-up and checks. `make demo` and `make test` are all a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := 2.13.0

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Exactly this torch first: the CPU wheel on local disk. Anything else would pull a CUDA build.
	$(BIN)/pip install -q torch==$(TORCH)
	# ksuit with every extra the tests need (demo data, S3, Lightning, Transformers, linters)
	$(BIN)/pip install -q -e '.[dev]'
	# nothing above may have replaced torch
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '$(TORCH)' else 'torch ' + v + ' replaced $(TORCH)')"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/ksuit train examples/autoencoder.yaml --output runs --run-id demo
	$(BIN)/ksuit ls runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_save_load.py --out benchmarks/results.json
	$(BIN)/python benchmarks/bench_sharded.py --out benchmarks/results_sharded.json
	$(BIN)/python benchmarks/bench_s3.py --out benchmarks/results_s3.json

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
