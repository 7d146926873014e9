"""One run's files and loop state inside the trainer: its data order, metric rows,
checkpoints, stop and divergence rules and status; several of them train packed."""

import dataclasses
import math
import time
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from bscan import batch_schedule
from bscan import branching
from bscan import checkpoint as checkpoint_lib
from bscan import data as data_lib
from bscan import tasks
from bscan import stopping
from bscan import workdir as workdir_lib
from bscan.workdir import Col


class Run:
  """One run's files and loop state: data order, metric rows, checkpoints, stop rules."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: epath.Path,
               plan: workdir_lib.RunPlan, task: tasks.Task):
    self.cfg, self.workdir, self.plan = cfg, workdir, plan
    self.is_main = jax.process_index() == 0
    self.data_iter = task.train_iterator(jax.process_index(), jax.process_count())
    self.writer = workdir_lib.MetricsWriter(workdir, enabled=self.is_main)
    self.ckpt = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    b = cfg.budget
    self.ramp = batch_schedule.Ramp.from_config(cfg)  # None: one batch for the whole run
    # A token budget or cap ends a ramp by tokens (its steps vary); a step budget by steps.
    self.max_tokens = math.inf if b.train_steps else plan.max_tokens
    self.stop_rule = stopping.StopRule.from_tokens(
        b.target_loss, b.overshoot, plan.max_steps, plan.batch_tokens, b.smoothing_tokens)
    self.divergence = stopping.DivergenceRule(b.diverge_margin, b.diverge_patience)
    self.loop = stopping.LoopState()
    self.step = 0  # last dispatched step
    self.tokens = 0  # tokens trained through the last dispatched step
    self._last_fetch = None
    self.diverged = ""  # the reason, once diverged
    self.step_diverged = 0
    self.ended = ""  # the final status, once written
    self.label = ""  # prefix of its progress lines: its arg when packed with others

  def close(self) -> None:
    self.writer.close()
    self.ckpt.close()

  def restore(self, abstract_state: Any) -> Any:
    """The newest intact checkpoint's state (None: start over); rows cut back to its step."""
    restored = None
    if self.ckpt.latest_step() is not None:
      restored = self.ckpt.restore(abstract_state, self.data_iter,
                                   lambda loop: stopping.LoopState(**loop))
    if restored is None:
      self.writer.resume(0, None)  # rows of an attempt that ended before any checkpoint
      if not branching.is_branch(self.cfg):
        return None
      state = branching.restore(self.cfg, self.workdir, self.plan.data_shards, abstract_state,
                                self.data_iter, self.plan.batch_tokens)
      if self.is_main:
        print(f"{self.label}branched from {self.cfg.branch.from_workdir} at step "
              f"{self.cfg.branch.from_step} (replicate {self.cfg.branch.replicate})", flush=True)
      return state
    self.step, state, self.loop = restored
    # Checkpoints from before batch ramps hold tokens=0: their runs had one batch.
    self.tokens = self.loop.tokens or self.step * self.plan.batch_tokens
    self.loop = dataclasses.replace(self.loop, tokens=self.tokens)
    # Checkpoints written before rows were counted hold rows=0: nothing to check against.
    self.writer.resume(self.step, self.loop.rows or None)
    if self.is_main:
      print(f"{self.label}resumed from the checkpoint at step {self.step}", flush=True)
    return state

  def wants_step(self) -> bool:
    """Whether the next step runs (decided on the rows fetched so far, one step behind)."""
    return (not self.diverged and self.step < self.stop_rule.stop_step(self.loop)
            and self.tokens < self.max_tokens)

  def last_step(self) -> bool:
    """Whether the step just dispatched is the run's last (its row gets an eval loss)."""
    return (self.step == self.stop_rule.stop_step(self.loop)
            or self.tokens >= self.max_tokens)

  def next_batch_size(self) -> int:
    """The global batch (sequences) of the next step."""
    if self.ramp is None:
      return self.plan.batch_sequences
    changes = tuple(batch_schedule.Change(*c) for c in self.loop.changes)
    return self.ramp.batch_for(self.step + 1, self.tokens, changes)

  def next_batch(self, batch: int = 0) -> np.ndarray:
    """This process's rows of the next global batch (of `batch` sequences, on a ramp)."""
    if self.ramp is not None:
      data_lib.set_batch(self.data_iter, self.cfg, batch)
    return next(self.data_iter)

  def write_status(self, status: str, reason: str, step: int) -> None:
    if self.is_main:
      tokens = self.loop.tokens if step == self.step else step * self.plan.batch_tokens
      workdir_lib.write_status(self.workdir, status, reason, step, tokens)
    if status in workdir_lib.FINAL_STATES + (workdir_lib.PREEMPTED,):
      self.ended = status

  def save(self, state: Any, force: bool = False) -> None:
    self.writer.flush()
    self.ckpt.save(self.step, state, self.data_iter, dataclasses.asdict(self.loop), force=force)

  def end(self, state: Any) -> str:
    """Writes the final status (and checkpoint) of a run that stopped training."""
    if self.diverged:
      self.write_status(workdir_lib.DIVERGED, self.diverged, self.step_diverged)
      return workdir_lib.DIVERGED
    if self.ckpt.latest_step() != self.step:
      self.save(state, force=True)
    reason = self.stop_rule.reason(self.loop)
    if self.step < self.stop_rule.stop_step(self.loop):  # the tokens ran out first (a ramp)
      reason = f"{self.plan.max_tokens} tokens trained" + (
          f" before target loss {self.stop_rule.target_loss}"
          if self.stop_rule.target_loss and not self.loop.target_step else "")
    self.write_status(workdir_lib.DONE, reason, self.step)
    if self.is_main:
      print(f"{self.label}done: {reason} → {self.workdir}", flush=True)
    return workdir_lib.DONE

  def preempt(self, state: Any) -> str:
    """Saves and marks the run preempted (a diverged run ends as diverged instead)."""
    if self.diverged:
      return self.end(state)
    self.save(state)
    self.ckpt.wait()
    self.write_status(workdir_lib.PREEMPTED,
                      f"SIGTERM at step {self.step}; rerun the same command to resume", self.step)
    return workdir_lib.PREEMPTED

  def finish(self, step: int, m: dict[str, Any], eval_loss, batch: int = 0) -> None:
    """Writes one step's row (fetched metrics; the step trained `batch` sequences) and applies
    the stop and divergence rules and the ramp's controller."""
    now = time.perf_counter()
    dt = now - self._last_fetch if self._last_fetch is not None else float("nan")
    self._last_fetch = now
    loss = float(m["train_loss"])
    batch = batch or self.plan.batch_sequences
    tokens = batch * self.plan.seq_len
    self.loop = dataclasses.replace(self.loop, tokens=self.loop.tokens + tokens)
    row = {Col.STEP: step, Col.TOKENS: self.loop.tokens, Col.BATCH: batch,
           **({Col.OVERHEAD_TOKENS: self.loop.overhead_tokens}
              if self.ramp is not None and self.ramp.branched else {}),
           Col.TRAIN_LOSS: loss,
           Col.LR: float(m["lr"]), Col.GRAD_NORM: float(m["grad_norm"]), Col.STEP_TIME_S: dt,
           Col.TOKENS_PER_S: tokens / dt if dt == dt else float("nan")}
    if eval_loss is not None:
      row[Col.EVAL_LOSS] = float(eval_loss)
    noise_columns = self._noise_columns(step, m)
    row.update(noise_columns)
    self.loop = self.divergence.update(self.loop, loss)
    reason = self.divergence.diverged(self.loop, loss)
    rare = eval_loss is not None or Col.B_NOISE_TOKENS in row or any(
        k.startswith(Col.GROUP_PREFIX) for k in noise_columns)  # never drop cadenced rows
    if step % self.cfg.log_every_steps == 0 or rare or reason:
      self.writer.write(row)
      self.loop = dataclasses.replace(self.loop, rows=self.loop.rows + 1)
    if eval_loss is not None and self.is_main:
      speed = row[Col.TOKENS_PER_S]  # none yet on the first step after a start
      speed = f"{speed:>8.0f} tokens/s" if math.isfinite(speed) else "       – tokens/s"
      print(f"{self.label}step {step:>6}  tokens {row[Col.TOKENS]:>11,}  train {loss:.4f}  eval "
            f"{row[Col.EVAL_LOSS]:.4f}  B_simple "
            f"{row.get(Col.B_SIMPLE_TOKENS, float('nan')):>9.0f} tokens  {speed}", flush=True)
    if reason and not self.diverged:
      self.diverged, self.step_diverged = f"{reason} at step {step}", step
      return
    self.loop = self.stop_rule.update(self.loop, step, loss, tokens)
    if self.ramp is not None and self.ramp.controller is not None:
      self._decide(step, m)

  def _decide(self, step: int, m: dict[str, Any]) -> None:
    """The controller's decision on this step's metrics (it applies from step + 2)."""
    changes = tuple(batch_schedule.Change(*c) for c in self.loop.changes)
    decided = self.ramp.decide(changes, step, self.loop.tokens, m)
    if decided != changes:
      new = decided[-1]
      self.loop = dataclasses.replace(
          self.loop, changes=tuple(dataclasses.astuple(c) for c in decided))
      if self.is_main:
        old = changes[-1].batch if changes else self.ramp.first
        noise = float(m[self.ramp.estimate]) / self.plan.seq_len
        print(f"{self.label}step {step:>6}  batch {old} → {new.batch} from step {new.step} "
              f"({self.ramp.estimate} {noise:.1f} sequences)", flush=True)

  def _noise_columns(self, step: int, m: dict[str, Any]) -> dict[str, float]:
    if "b_simple" not in m:
      return {}
    seq = self.cfg.seq_len
    cols = {k: float(m[k]) for k in (Col.G_SMALL_SQ, Col.G_BIG_SQ, Col.GSQ, Col.TRACE)}
    cols[Col.B_SIMPLE_TOKENS] = float(m["b_simple"])
    cols[Col.B_SIMPLE_SEQS] = float(m["b_simple"]) / seq
    group_every = self.cfg.noise.group_every
    if group_every and step % group_every == 0:
      for key, value in m.items():
        if key.startswith(Col.GROUP_PREFIX) and key.endswith("/b_simple"):
          cols[key + "_tokens"] = float(value)
    if "b_noise" in m:  # Hessian-weighted, on its cadence; NaN (null) when GᵀHG ≤ 0
      cols.update({k: float(m[k]) for k in (Col.Q_SMALL, Col.Q_BIG, Col.GHG, Col.TRHS,
                                            Col.B_NOISE_UNDEFINED)})
      cols[Col.B_NOISE_TOKENS] = float(m["b_noise"])
      cols[Col.B_NOISE_SEQS] = float(m["b_noise"]) / seq
    return cols


def share_data(runs: list[Run]) -> bool:
  """Gives runs one data iterator when their streams are the same (True) — same data config
  and seed, at the same position (a learning-rate sweep) — so the pack reads it once.

  Each run still checkpoints the shared iterator's state, the one its own would have.
  """
  first = runs[0]
  data = first.cfg.data.to_dict()  # dicts: a locked ConfigDict never equals an unlocked one
  same = all(r.cfg.seed == first.cfg.seed and r.cfg.data.to_dict() == data and
             r.data_iter.get_state() == first.data_iter.get_state() for r in runs[1:])
  if same:
    for r in runs[1:]:
      r.data_iter = first.data_iter
  return same
