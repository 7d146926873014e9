"""Branch runs (Merrill et al. 2025 §3.1): start from a reference run's checkpoint.

A branch restores the reference's parameters, optimizer state and data position at
`branch.from_step`, then trains `budget.train_tokens` (Δ) at its own batch size — k times the
reference's, the learning rate rescaled by bscan.lr_scaling. Its per-shard data stream is the
reference's: at k·B a step reads k of the reference's batches from each shard, so every k
sees the same tokens in Δ. Replicate j skips the j·Δ tokens that replicates 0..j−1 read, so
replicates are independent draws of data and every k of one replicate is paired with the
same data: the analysis compares k to k = 1 replicate by replicate (bscan.analysis.branches).
"""

from __future__ import annotations

import math
from typing import Any

from etils import epath
import ml_collections

from bscan import checkpoint as checkpoint_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError


def is_branch(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the config trains a branch of another run."""
  branch = cfg.get("branch")
  return bool(branch and branch.from_workdir)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """The branch fields, before anything is built."""
  b = cfg.branch
  if b.from_step <= 0:
    raise ConfigError(f"branch.from_step={b.from_step}: name the reference checkpoint's step "
                      "(a positive step of branch.from_workdir's checkpoints)")
  if b.replicate < 0:
    raise ConfigError(f"branch.replicate={b.replicate} must be ≥ 0")
  if not cfg.budget.train_tokens or cfg.budget.target_loss:
    raise ConfigError("a branch trains a fixed Δ: set budget.train_tokens (and no "
                      "budget.target_loss)")


def check_reference(cfg: ml_collections.ConfigDict, workdir: epath.Path,
                    data_shards: int) -> epath.Path:
  """The reference run's dir, after checking that its data stream is this branch's."""
  ref = workdir_lib.branch_reference(workdir, cfg.branch.from_workdir)
  saved = workdir_lib.read_config(ref)
  if saved is None:
    raise ConfigError(f"branch.from_workdir={cfg.branch.from_workdir!r}: {ref} holds no run "
                      f"({workdir_lib.CONFIG} missing); train the reference run first")
  ref_shards = saved.derived.get("data_shards", 1)
  if ref_shards != data_shards:
    raise ConfigError(
        f"the reference {ref} reads its batch as {ref_shards} data shard(s) and this branch "
        f"as {data_shards}: their data streams differ; set data.shards={ref_shards} here")
  if saved.config.get("seed") != cfg.seed:
    raise ConfigError(f"seed={cfg.seed} differs from the reference's {saved.config.get('seed')}:"
                      " a branch continues the reference's data order; use branch.replicate "
                      "for independent draws")
  return ref


def restore(cfg: ml_collections.ConfigDict, workdir: epath.Path, data_shards: int,
            abstract_state: Any, data_iter: Any, batch_tokens: int) -> Any:
  """The reference's train state at branch.from_step, with `data_iter` at this replicate's
  position (the reference's, plus replicate·Δ tokens)."""
  ref = check_reference(cfg, workdir, data_shards)
  ckpt = checkpoint_lib.Checkpointer(ref, keep=1, read_only=True)
  try:
    state = ckpt.restore_step(cfg.branch.from_step, abstract_state, data_iter)
  finally:
    ckpt.close()
  for _ in range(cfg.branch.replicate * math.ceil(cfg.budget.train_tokens / batch_tokens)):
    next(data_iter)
  return state
