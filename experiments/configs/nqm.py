"""The noisy quadratic model through the real sweep, launcher and analysis: a known answer.

SGD on ½θᵀHθ with per-example gradient noise Σ = 0.05·H (dim 256, condition number 1000),
batch sizes 4–512 examples × 6 constant learning rates, each run until its smoothed loss
reaches the lowest target. The noise puts the exact B_crit (15–82 examples) inside the batch
range, and the targets start where every run needs ≥ 20 steps (below that the analysis'
10-step minimum would drop the fastest runs and bias S_min). bscan.nqm_theory gives the exact scan B_crit of this very grid and protocol;
`make nqm` runs the scan and `python -m experiments.nqm_check` compares the two.

python -m launch.local --config=experiments/configs/nqm.py --workdir=runs/nqm --parallel=2 --pack=8
python -m experiments.train --config=experiments/configs/nqm.py:batch=16,lr=0.1 --workdir=...
"""

import numpy as np

from bscan import config as config_lib
from bscan import nqm_theory
from bscan import sweep as sweep_lib
from experiments.configs import base

DIM, CONDITION, NOISE, PROBLEM_SEED = 256, 1000.0, 0.05, 0
BATCHES = (4, 8, 16, 32, 64, 128, 256, 512)  # examples (= tokens: one token per example)
LRS = tuple(float(f"{lr:.3g}") for lr in np.geomspace(0.09, 1.8, 6))  # below 2/h_max = 2


def problem() -> nqm_theory.Problem:
  return nqm_theory.make_problem(DIM, CONDITION, NOISE, PROBLEM_SEED)


def targets() -> tuple[float, ...]:
  """Six targets over a factor 8 of loss, from where gradient descent needs 20 steps at the
  grid's best rate (rounded so that they print and compare exactly)."""
  chosen = nqm_theory.choose_targets(problem(), LRS, n=6, first_step=20, span=8.0)
  return tuple(float(f"{t:.4g}") for t in chosen)


def cap_tokens(batch: int) -> int:
  """A cap above 1.25 × E = B·S of every batch at its best rate for the lowest target."""
  return 300 * batch + 24_000


def get_config(arg: str = ""):
  """One point: arg keys batch, lr, seed (and target, max_tokens, ...)."""
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, base.COMMON_ARGS, "nqm.py")
  c = base.get_base_config()
  c.task = "nqm"
  c.nqm = base.nqm_fields(DIM, CONDITION, NOISE, PROBLEM_SEED)
  c.model.size = f"nqm{DIM}"
  c.seq_len = 1
  c.batch_size = 16
  c.optim.name = "sgd"
  c.optim.lr = 0.1
  c.optim.clip_norm = 0.0  # the closed form is plain SGD
  c.optim.warmup_tokens = 0
  c.budget.target_loss = min(targets())
  c.budget.overshoot = 0.25
  c.budget.smoothing_tokens = 500
  c.budget.diverge_margin = 1e6  # the loss starts high and noisy: only NaN/inf is divergence
  c.eval.per_decade, c.eval.every_steps = 8, 0
  c.data.eval_sequences = 8  # the exact loss: every held-out row is noise-free
  c.noise.hessian_every = 10
  c.noise.group_every = 10
  c.checkpoint.every_steps = 2000
  c = base.apply_args(c, args)
  if "max_tokens" not in args:
    c.budget.max_tokens = cap_tokens(c.batch_size)
  c.microbatch_size = max(1, c.batch_size // 4)  # K = 4: one held out for H·v
  return c


def sweep() -> sweep_lib.Sweep:
  """Every batch size × every learning rate, one seed."""
  points = [{"batch": b, "lr": lr} for b in BATCHES for lr in LRS]
  return sweep_lib.Sweep(points=tuple(points), targets=tuple(sorted(targets(), reverse=True)))
