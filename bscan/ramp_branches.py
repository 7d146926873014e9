"""The branched ramp controller inside the trainer: test from the run itself, keep one branch.

At a test, the run reads the next Δ tokens of its stream at its batch B once, then trains a
copy of its state on them at k·B for each k tested (a k·B batch is k consecutive B batches,
shard by shard: every k sees the same tokens in the same per-shard order). Each branch ends
with the held-out loss; the run keeps the branch at the local critical batch size
(bscan.batch_schedule.BranchedController.choose): its steps become the run's rows and its
batch the run's from then on. The token stream is the fixed-batch one whichever branch is
kept; the other branches' tokens are counted as overhead (LoopState.overhead_tokens, the
rows' ramp_overhead_tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bscan import batch_schedule
from bscan import run as run_lib


def merge_batches(batches: list[np.ndarray], shards: int) -> np.ndarray:
  """k batches of this process's rows (`shards` blocks each) as one batch of k·B rows, each
  shard's block holding its k blocks in order."""
  blocks = [b.reshape(shards, -1, *b.shape[1:]) for b in batches]
  merged = np.concatenate(blocks, axis=1)
  return merged.reshape(-1, *batches[0].shape[1:])


def due(run: run_lib.Run) -> bool:
  """Whether the run tests before its next step."""
  ramp = run.ramp
  if ramp is None or ramp.branched is None or run.tokens < ramp.start_tokens:
    return False
  batch = run.next_batch_size()
  return (ramp.branched.due(run.tokens, run.loop.last_test_tokens)
          and len(ramp.branched.ks_for(batch)) > 1)


def test(trainer: Any, run: run_lib.Run, state: Any) -> Any:
  """Runs one test (every pending row fetched first) and returns the kept branch's state."""
  controller = run.ramp.branched
  batch = run.next_batch_size()
  ks = controller.ks_for(batch)
  seq = run.plan.seq_len
  n = controller.branch_steps(batch, seq, 1)  # batches of B read once, shared by every k
  local_shards = run.plan.data_shards // run.plan.num_processes
  rows = [run.next_batch(batch) for _ in range(n)]
  losses, kept = {}, {}
  for k in ks:
    s = jax.tree.map(jnp.copy, state)  # the step donates its input
    step_fn = trainer.compiled(k * batch).train_step
    metrics = []
    for i in range(0, n, k):
      local = merge_batches(rows[i:i + k], local_shards)
      s, m = step_fn(s, jax.make_array_from_process_local_data(trainer.batch_sharding, local))
      metrics.append(m)
    eval_loss = trainer.eval_fn(s.params, trainer.eval_tokens)
    losses[k] = float(eval_loss)
    kept[k] = (s, metrics, eval_loss)
  new_batch = controller.choose(batch, losses)
  k_kept = new_batch // batch
  state, metrics, eval_loss = kept[k_kept]
  del kept
  spent = n * batch * seq  # Δ, rounded to whole steps
  run.loop = dataclasses.replace(
      run.loop, last_test_tokens=run.tokens + spent,
      overhead_tokens=run.loop.overhead_tokens + (len(ks) - 1) * spent)
  if run.is_main:
    shown = ", ".join(f"k={k}: {v:.4f}" for k, v in losses.items())
    print(f"step {run.step:>6}  branched test at batch {batch} over {spent:,} tokens ({shown}):"
          f" {'batch ' + str(new_batch) if k_kept > 1 else 'batch stays ' + str(batch)}",
          flush=True)
  fetched = jax.device_get(metrics)
  for i, m in enumerate(fetched):
    run.step += 1
    run.tokens += new_batch * seq
    last = i == len(fetched) - 1
    run.finish(run.step, m, eval_loss if last else None, new_batch)
  if k_kept > 1:
    change = batch_schedule.Change(run.step + 1, new_batch, run.tokens)
    run.loop = dataclasses.replace(run.loop,
                                   changes=run.loop.changes + (dataclasses.astuple(change),))
  return state
