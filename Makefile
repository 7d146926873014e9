# Quick start: `make scan` (the main job on the embedded default) and `make test`.
# Each target creates .venv and installs bscan into it first (from a bare python3).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SWEEP_DIR ?= runs/scan
COMPARE_DIR ?= runs/compare
NQM_DIR ?= runs/nqm
RAMP_DIR ?= runs/ramp

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install test scan compare nqm ramp demo demo-multiprocess benchmark
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

scan: install
	$(PY) -m launch.local --config=experiments/configs/scan.py --workdir=$(SWEEP_DIR) --parallel=2

# Every estimate of the critical batch size for one model: the scan (B_crit, B_simple,
# B_noise), then branches from the reference run's checkpoints, then one analysis of both.
compare: install
	$(PY) -m launch.local --config=experiments/configs/compare.py --workdir=$(COMPARE_DIR)/scan \
	  --parallel=2 --analysis=false
	$(PY) -m launch.local --config=experiments/configs/compare_branches.py \
	  --workdir=$(COMPARE_DIR)/branches --parallel=2 --pack=3 --analysis=false
	$(PY) -m bscan.analysis --workdir=$(COMPARE_DIR)/scan,$(COMPARE_DIR)/branches \
	  --out=$(COMPARE_DIR)/analysis

# Fixed batches against batches that grow (a declared ramp, noise-scale and branched
# controllers), three seeds each, then the steps/tokens table, the claim test and the figure.
ramp: install
	$(PY) -m launch.local --config=experiments/configs/ramp.py --workdir=$(RAMP_DIR) --parallel=2 \
	  --pack=3 --analysis=false
	$(PY) -m experiments.ramp_table --workdir=$(RAMP_DIR)

# The noisy quadratic model through the real sweep, launcher and analysis, against its
# closed-form scan B_crit.
nqm: install
	$(PY) -m launch.local --config=experiments/configs/nqm.py --workdir=$(NQM_DIR) --parallel=2 \
	  --pack=6 --analysis=false
	$(PY) -m experiments.nqm_check --workdir=$(NQM_DIR)

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
