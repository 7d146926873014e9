# Quick start: `make scan` (the main job on the embedded default) and `make test`.
# Each target creates .venv and installs bscan into it first (from a bare python3).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SWEEP_DIR ?= runs/scan

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install test scan demo demo-multiprocess benchmark
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

scan: install
	$(PY) -m launch.local --config=experiments/configs/scan.py --workdir=$(SWEEP_DIR) --parallel=2

demo: install
	$(PY) -m experiments.train --config=experiments/configs/demo.py --workdir=runs/demo-run

# The demo run as 2 local JAX processes x 4 CPU devices (a 2-host pod on one machine).
demo-multiprocess: install
	$(PY) -m launch.multiprocess --processes=2 --devices_per_process=4 -- \
	  --config=experiments/configs/demo.py --workdir=runs/demo-2x4

# The train-step benchmark against the PyTorch reference (torch, CPU build, into the venv only
# here: bscan itself never needs it), pinned to one core when taskset exists.
BENCH_ARGS ?= --size=3m,98k --batch=16 --seq_len=256 --json=runs/benchmark.json
benchmark: install
	$(PY) -m pip install --quiet torch
	mkdir -p runs
	$$(command -v taskset >/dev/null && echo taskset -c 0) $(PY) -m experiments.benchmark $(BENCH_ARGS)
