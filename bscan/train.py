"""The training loop: one run of one config in one workdir, resumable, with a stop condition."""

import dataclasses
import json
import math
import secrets
import signal
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from bscan import checkpoint as checkpoint_lib
from bscan import config as config_lib
from bscan import data as data_lib
from bscan import model as model_lib
from bscan import noise_scale
from bscan import optim
from bscan import stopping
from bscan import train_step as step_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from bscan.workdir import Col


def eval_due(step: int, cfg: ml_collections.ConfigDict) -> bool:
  """Linear cadence and/or `per_decade` log-spaced steps (small batches take many steps)."""
  if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
    return True
  k = cfg.eval.per_decade
  if k:
    return step == 1 or math.floor(k * math.log10(step)) > math.floor(k * math.log10(step - 1))
  return False


def check_workdir(workdir: epath.Path, cfg: ml_collections.ConfigDict, allow_change: bool) -> None:
  """Refuses to mix two different configs in one workdir unless told to."""
  if allow_change:
    return
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    return
  old, new = _flatten(saved.config), _flatten(json.loads(cfg.to_json()))
  # Fields the saved config lacks were added by a later bscan: their defaults are no change.
  diffs = [k for k in sorted(old) if old[k] != new.get(k)]
  if diffs:
    shown = diffs[:6] + ([f"… {len(diffs) - 6} more"] if len(diffs) > 6 else [])
    raise ConfigError(
        f"workdir {workdir} holds a run with a different config (fields {shown}); use another "
        "--workdir, or pass --allow_config_change to continue it with the new config")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check_shared_workdir(workdir: epath.Path) -> None:
  """Every process must see one workdir (orbax saves from all of them into it): process 0
  writes a token there and the others read it, so a per-host directory fails here, with
  the processes that miss it named, instead of hanging in orbax's first barrier."""
  if jax.process_count() == 1:
    return
  is_main = jax.process_index() == 0
  token = secrets.token_hex(16)
  if is_main:
    workdir_lib.write_share_token(workdir, token)
  token = bytes(multihost_utils.broadcast_one_to_all(
      np.frombuffer(token.encode(), np.uint8))).decode()
  seen = workdir_lib.read_share_token(workdir) == token
  everyone = multihost_utils.process_allgather(np.array(seen))
  if is_main:
    workdir_lib.remove_share_token(workdir)
  missing = [i for i, ok in enumerate(np.asarray(everyone).reshape(-1)) if not ok]
  if missing:
    raise ConfigError(
        f"--workdir={workdir} is not one directory for all {jax.process_count()} processes: "
        f"process(es) {missing} do not see what process 0 wrote there; give every process "
        "the same shared directory (a shared file system or gs://)")


def _saved_status(workdir: epath.Path) -> str | None:
  """The status a previous attempt left; a damaged status.json is reported and rebuilt."""
  try:
    status = workdir_lib.read_status(workdir)
  except ConfigError as e:
    if jax.process_index() == 0:
      print(f"warning: {e} (the run resumes from its checkpoint and rewrites it)", flush=True)
    return None
  return status.status if status else None


PREEMPTION_SYNC_EVERY = 10  # steps between the hosts' agreement on a SIGTERM (multi-host)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self, step: int) -> bool:
    """Whether all processes stop at this step: hosts get SIGTERM at different times, and
    one host saving (a barrier) while another runs the next step would deadlock."""
    if jax.process_count() == 1:
      return self.requested
    if step % PREEMPTION_SYNC_EVERY:
      return False
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run(cfg: ml_collections.ConfigDict, workdir: epath.PathLike, arg: str = "",
        allow_config_change: bool = False) -> str:
  """Trains (or resumes) one run; returns its final status (done / diverged / preempted).

  Every input is checked before anything is built (config, data, tokenizer settings, the
  workdir and the config it holds): a ConfigError names the field or file and the fix.
  """
  workdir = epath.Path(workdir)
  num_devices = jax.device_count()
  config_lib.validate(cfg, num_devices, jax.process_count())
  workdir_lib.check_usable(workdir)
  check_shared_workdir(workdir)
  check_workdir(workdir, cfg, allow_config_change)
  status = _saved_status(workdir)
  finished = status in workdir_lib.FINAL_STATES
  if jax.process_count() > 1:  # process 0 wrote it; workers may not see the same disk
    finished = bool(multihost_utils.broadcast_one_to_all(np.array(finished)))
    status = status if finished else None
  if finished:
    if jax.process_index() == 0:
      print(f"{workdir}: already {status}; nothing to do (use a new --workdir to train again)",
            flush=True)
    return status

  is_main = jax.process_index() == 0
  if jax.process_count() > 1:  # hosts may share a data dir: one builds, then all read
    if is_main:
      data_lib.prepare(cfg)
    multihost_utils.sync_global_devices("bscan_data_prepared")
  tokenizer = data_lib.get_tokenizer(cfg)
  device = jax.devices()[0]
  plan = config_lib.plan(cfg, arg, tokenizer.vocab_size, num_devices, jax.process_count(),
                         jax.default_backend(), device.device_kind)
  if is_main:
    print(f"JAX {jax.__version__} on {plan.backend}: {num_devices} × {plan.device_kind} in "
          f"{plan.num_processes} process(es); batch {plan.batch_sequences} = "
          f"{plan.data_shards} data shard(s)", flush=True)
    workdir_lib.write_config(workdir, json.loads(cfg.to_json()), arg, plan)
  trainer = None
  try:
    trainer = Trainer(cfg, workdir, plan)
    return trainer.train()
  except Exception as e:  # Recorded for the launcher and the analysis, then re-raised.
    if is_main:
      step = trainer.step if trainer else 0
      workdir_lib.write_status(workdir, workdir_lib.FAILED, f"{type(e).__name__}: {e}", step,
                               step * plan.batch_tokens)
    raise
  finally:
    if trainer:
      trainer.close()


class Trainer:
  """Builds mesh, model, step, data and checkpoints for one run, then loops."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: epath.Path,
               plan: workdir_lib.RunPlan):
    self.cfg, self.workdir, self.plan = cfg, workdir, plan
    self.is_main = jax.process_index() == 0
    self.mesh = step_lib.make_mesh()
    self.sc = step_lib.StepConfig(
        num_microbatches=plan.num_microbatches, microbatch=plan.microbatch_sequences,
        seq_len=plan.seq_len, num_devices=plan.num_devices, noise=cfg.noise.enabled,
        ema_decay=cfg.noise.ema_decay)
    model = model_lib.Transformer(config_lib.model_config(cfg, plan.vocab_size))
    self.loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
    self.lr = optim.schedule(cfg, plan.learning_rate)
    tx = optim.optimizer(cfg, self.lr)
    self.train_step = step_lib.make_train_step(self.loss_fn, tx, self.lr, self.sc, self.mesh)
    self.hessian_fn = None
    if cfg.noise.hessian_every:
      curvature = "hessian" if cfg.noise.curvature == "hessian" else noise_scale.GaussNewton(
          lambda p, b: model_lib.logits_fn(model, p, b), model_lib.cross_entropy)
      self.hessian_fn = step_lib.make_hessian_fn(self.loss_fn, self.sc, self.mesh, curvature)
    dummy = np.zeros((1, cfg.seq_len), np.int32)
    init_params = lambda rng: model.init(rng, dummy)["params"]
    groups = noise_scale.param_groups(jax.eval_shape(init_params, jax.random.key(0)))
    self.state = step_lib.init_state(init_params, tx, jax.random.key(cfg.seed), self.mesh, groups)
    self.data_iter = data_lib.make_train_iterator(
        cfg, process_index=jax.process_index(), process_count=jax.process_count())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    eval_tokens = data_lib.make_eval_batches(cfg)  # the same on every process
    self.eval_tokens = jax.make_array_from_callback(
        eval_tokens.shape, self.batch_sharding, lambda index: eval_tokens[index])
    chunk = math.gcd(len(eval_tokens) // plan.num_devices, plan.microbatch_sequences)
    self.eval_fn = step_lib.make_eval_fn(self.loss_fn, self.mesh, chunk)
    self.writer = workdir_lib.MetricsWriter(workdir, enabled=self.is_main)
    self.ckpt = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    b = cfg.budget
    self.stop_rule = stopping.StopRule.from_tokens(
        b.target_loss, b.overshoot, plan.max_steps, plan.batch_tokens, b.smoothing_tokens)
    self.divergence = stopping.DivergenceRule(b.diverge_margin, b.diverge_patience)
    self.loop = stopping.LoopState()
    self.step = 0  # last dispatched step
    self._last_fetch = None
    self._diverged = ""  # the reason, once diverged
    self.step_diverged = 0

  def close(self) -> None:
    self.writer.close()
    self.ckpt.close()

  def _restore(self) -> int:
    """Restores the newest intact checkpoint (or none) and cuts the rows back to its step."""
    restored = None
    if self.ckpt.latest_step() is not None:
      restored = self.ckpt.restore(checkpoint_lib.abstract(self.state), self.data_iter,
                                   lambda loop: stopping.LoopState(**loop))
    if restored is None:
      self.writer.resume(0, None)  # rows of an attempt that ended before any checkpoint
      return 0
    step, self.state, self.loop = restored
    # Checkpoints written before rows were counted hold rows=0: nothing to check against.
    self.writer.resume(step, self.loop.rows or None)
    if self.is_main:
      print(f"resumed from the checkpoint at step {step}", flush=True)
    return step

  def _status(self, status: str, reason: str, step: int) -> None:
    if self.is_main:
      workdir_lib.write_status(self.workdir, status, reason, step, step * self.plan.batch_tokens)

  def _save(self, step: int, force: bool = False) -> None:
    self.writer.flush()
    self.ckpt.save(step, self.state, self.data_iter, dataclasses.asdict(self.loop), force=force)

  def train(self) -> str:
    """The loop: dispatch step n, then fetch step n−1's metrics (never block needlessly)."""
    step = self.step = self._restore()
    self._status(workdir_lib.RUNNING, "", step)
    if self.sc.noise and self.sc.b_small == self.sc.b_big:
      logging.warning("Noise scale undefined: one device and one microbatch (B_small = B_big); "
                      "set microbatch_size below batch_size to measure it. Training on.")
    preemption = _Preemption()
    pending = None
    try:
      while not self._diverged and step < self.stop_rule.stop_step(self.loop):
        local = next(self.data_iter)
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local)
        if self.hessian_fn and (step + 1) % self.cfg.noise.hessian_every == 0:
          hessian = self.hessian_fn(self.state.params, batch)  # on the params this step uses
        else:
          hessian = {}
        self.state, train_metrics = self.train_step(self.state, batch)
        train_metrics = {**train_metrics, **hessian}
        step = self.step = step + 1
        last = step == self.stop_rule.stop_step(self.loop)  # the final row gets an eval loss
        eval_loss = (self.eval_fn(self.state.params, self.eval_tokens)
                     if eval_due(step, self.cfg) or last else None)
        if pending:
          self._finish(*pending)
        pending = (step, train_metrics, eval_loss)
        preempted = preemption.agreed(step)
        if step % self.cfg.checkpoint.every_steps == 0 or preempted:
          self._finish(*pending)
          pending = None
          if not self._diverged:
            self._save(step)
          if preempted and not self._diverged:
            self.ckpt.wait()
            self._status(workdir_lib.PREEMPTED,
                         f"SIGTERM at step {step}; rerun the same command to resume", step)
            return workdir_lib.PREEMPTED
      if pending:
        self._finish(*pending)
    finally:
      preemption.restore()
    if self._diverged:
      self._status(workdir_lib.DIVERGED, self._diverged, self.step_diverged)
      return workdir_lib.DIVERGED
    if self.ckpt.latest_step() != step:
      self._save(step, force=True)
    reason = self.stop_rule.reason(self.loop)
    self._status(workdir_lib.DONE, reason, step)
    if self.is_main:
      print(f"done: {reason} → {self.workdir}", flush=True)
    return workdir_lib.DONE

  def _finish(self, step: int, train_metrics: dict[str, Any], eval_loss) -> None:
    """Fetches one step's metrics, writes its row, and applies the stop and divergence rules."""
    m = jax.device_get(train_metrics)
    now = time.perf_counter()
    dt = now - self._last_fetch if self._last_fetch is not None else float("nan")
    self._last_fetch = now
    loss = float(m["train_loss"])
    tokens = self.plan.batch_tokens
    row = {Col.STEP: step, Col.TOKENS: step * tokens, Col.TRAIN_LOSS: loss,
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
      print(f"step {step:>6}  tokens {row[Col.TOKENS]:>11,}  train {loss:.4f}  eval "
            f"{row[Col.EVAL_LOSS]:.4f}  B_simple "
            f"{row.get(Col.B_SIMPLE_TOKENS, float('nan')):>9.0f} tokens  {speed}", flush=True)
    if reason and not self._diverged:
      self._diverged, self.step_diverged = f"{reason} at step {step}", step
      return
    self.loop = self.stop_rule.update(self.loop, step, loss)

  def _noise_columns(self, step: int, m: dict[str, Any]) -> dict[str, float]:
    if not self.sc.noise:
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
