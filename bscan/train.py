"""The training loop: one run of one config in one workdir, resumable, with a stop condition."""

import dataclasses
import json
import math
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
from bscan import metrics as metrics_lib
from bscan import model as model_lib
from bscan import noise_scale
from bscan import optim
from bscan import train_step as step_lib


@dataclasses.dataclass
class LoopState:
  """Host-side counters that decide when to stop; checkpointed so resumes decide alike."""

  loss_ema: float = 0.0
  loss_ema_count: int = 0
  target_step: int = 0  # first step whose smoothed loss reached the target (0 = not yet)

  def smoothed(self, decay: float) -> float:
    return self.loss_ema / (1.0 - decay**self.loss_ema_count)


def eval_due(step: int, cfg: ml_collections.ConfigDict) -> bool:
  """Linear cadence and/or `per_decade` log-spaced steps (small batches take many steps)."""
  if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
    return True
  k = cfg.eval.per_decade
  if k:
    return step == 1 or math.floor(k * math.log10(step)) > math.floor(k * math.log10(step - 1))
  return False


def derived_values(cfg: ml_collections.ConfigDict, arg: str, vocab_size: int,
                   num_devices: int) -> dict[str, Any]:
  """What the analysis needs about a run, in sequences and in tokens."""
  mcfg = config_lib.model_config(cfg, vocab_size)
  n_params = model_lib.non_embedding_params(mcfg)
  lay = config_lib.layout(cfg, num_devices)
  return {
      "arg": arg, "size": cfg.model.size, "n_params": n_params,
      "n_params_embedding": model_lib.embedding_params(mcfg), "n_layer": mcfg.n_layer,
      "d_model": mcfg.d_model, "seq_len": cfg.seq_len, "batch_sequences": cfg.batch_size,
      "batch_tokens": config_lib.batch_tokens(cfg),
      "learning_rate": config_lib.peak_learning_rate(cfg, n_params), "seed": cfg.seed,
      "microbatch_sequences": lay.microbatch, "microbatch_tokens": lay.microbatch * cfg.seq_len,
      "num_devices": num_devices, "num_microbatches": lay.num_microbatches,
      "target_loss": cfg.budget.target_loss or None, "max_steps": config_lib.max_steps(cfg),
      "max_tokens": config_lib.max_steps(cfg) * config_lib.batch_tokens(cfg),
      "vocab_size": vocab_size, "dataset": cfg.data.tfds_name or cfg.data.name,
      "tokenizer": cfg.tokenizer.name, "corpus_fingerprint": data_lib.corpus_fingerprint(cfg),
  }


def check_workdir(workdir: epath.Path, cfg: ml_collections.ConfigDict, allow_change: bool) -> None:
  """Refuses to mix two different configs in one workdir unless told to."""
  path = workdir / "config.json"
  if not path.exists() or allow_change:
    return
  old = json.loads(path.read_text())["config"]
  new = json.loads(cfg.to_json())
  diffs = [k for k in sorted(set(_flatten(old)) | set(_flatten(new)))
           if _flatten(old).get(k) != _flatten(new).get(k)]
  if diffs:
    raise config_lib.ConfigError(
        f"workdir {workdir} holds a run with a different config (fields {diffs}); use another "
        "--workdir, or pass --allow_config_change to continue it with the new config")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


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
  """Trains (or resumes) one run; returns its final status (done / diverged / failed)."""
  workdir = epath.Path(workdir)
  num_devices = jax.device_count()
  config_lib.validate(cfg, num_devices)
  data_lib.validate_data_config(cfg)
  check_workdir(workdir, cfg, allow_config_change)
  status = (metrics_lib.read_status(workdir) or {}).get("status")
  finished = status in ("done", "diverged")
  if jax.process_count() > 1:  # process 0 wrote it; workers may not see the same disk
    finished = bool(multihost_utils.broadcast_one_to_all(np.array(finished)))
    status = status if finished else None
  if finished:
    if jax.process_index() == 0:
      print(f"{workdir}: already {status}; nothing to do (use a new --workdir to train again)",
            flush=True)
    return status

  is_main = jax.process_index() == 0
  tokenizer = data_lib.get_tokenizer(cfg)
  derived = derived_values(cfg, arg, tokenizer.vocab_size, num_devices)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(
        {"config": json.loads(cfg.to_json()), "arg": arg, "derived": derived}, indent=2))
  trainer = None
  try:
    trainer = Trainer(cfg, workdir, derived, tokenizer.vocab_size)
    return trainer.train()
  except Exception as e:  # Recorded for the launcher and the analysis, then re-raised.
    if is_main:
      step = trainer.step if trainer else 0
      metrics_lib.write_status(workdir, "failed", f"{type(e).__name__}: {e}", step,
                               step * derived["batch_tokens"])
    raise
  finally:
    if trainer:
      trainer.close()


class Trainer:
  """Builds mesh, model, step, data and checkpoints for one run, then loops."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: epath.Path,
               derived: dict[str, Any], vocab_size: int):
    self.cfg, self.workdir, self.derived = cfg, workdir, derived
    self.is_main = jax.process_index() == 0
    self.mesh = step_lib.make_mesh()
    lay = config_lib.layout(cfg, jax.device_count())
    self.sc = step_lib.StepConfig(
        num_microbatches=lay.num_microbatches, microbatch=lay.microbatch, seq_len=cfg.seq_len,
        num_devices=lay.num_devices, noise=cfg.noise.enabled, ema_decay=cfg.noise.ema_decay)
    model = model_lib.Transformer(config_lib.model_config(cfg, vocab_size))
    self.loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
    self.lr = optim.schedule(cfg, derived["learning_rate"])
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
    chunk = math.gcd(len(eval_tokens) // lay.num_devices, lay.microbatch)
    self.eval_fn = step_lib.make_eval_fn(self.loss_fn, self.mesh, chunk)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main)
    self.ckpt = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    self.loop = LoopState()
    self.max_steps = config_lib.max_steps(cfg)
    self.loss_decay = math.exp(-derived["batch_tokens"] / cfg.budget.smoothing_tokens)
    self.step = 0  # last dispatched step
    self._last_fetch = None
    self._diverged_step = 0

  def close(self) -> None:
    self.writer.close()
    self.ckpt.close()

  def _restore(self) -> int:
    if self.ckpt.latest_step() is None:
      self.writer.truncate_after(0)  # rows of an attempt that crashed before any checkpoint
      return 0
    self.state, loop = self.ckpt.restore(checkpoint_lib.abstract(self.state), self.data_iter)
    self.loop = LoopState(**loop)
    step = int(self.state.step)
    self.writer.truncate_after(step)
    if self.is_main:
      print(f"resumed from the checkpoint at step {step}", flush=True)
    return step

  def _status(self, status: str, reason: str, step: int) -> None:
    if self.is_main:
      metrics_lib.write_status(self.workdir, status, reason, step,
                               step * self.derived["batch_tokens"])

  def train(self) -> str:
    """The loop: dispatch step n, then fetch step n−1's metrics (never block needlessly)."""
    step = self.step = self._restore()
    self._status("running", "", step)
    if self.sc.noise and self.sc.b_small == self.sc.b_big:
      logging.warning("Noise scale undefined: one device and one microbatch (B_small = B_big); "
                      "set microbatch_size below batch_size to measure it. Training on.")
    preemption = _Preemption()
    pending, outcome = None, None
    try:
      while outcome is None and step < self.max_steps and not self._stop_due(step):
        local = next(self.data_iter)
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local)
        if self.hessian_fn and (step + 1) % self.cfg.noise.hessian_every == 0:
          hessian = self.hessian_fn(self.state.params, batch)  # on the params this step uses
        else:
          hessian = {}
        self.state, train_metrics = self.train_step(self.state, batch)
        train_metrics = {**train_metrics, **hessian}
        step = self.step = step + 1
        last = step == self.max_steps or step == self._stop_step()
        eval_loss = (self.eval_fn(self.state.params, self.eval_tokens)
                     if eval_due(step, self.cfg) or last else None)
        if pending:
          outcome = self._finish(*pending)
        pending = (step, train_metrics, eval_loss)
        preempted = preemption.agreed(step)
        if step % self.cfg.checkpoint.every_steps == 0 or preempted:
          outcome = outcome or self._finish(*pending)
          pending = None
          if outcome is None:
            self.writer.flush()
            self.ckpt.save(step, self.state, self.data_iter, dataclasses.asdict(self.loop))
          if preempted and outcome is None:
            self.ckpt.wait()
            reason = f"preempted (SIGTERM) at step {step}; rerun the same command to resume"
            self._status("failed", reason, step)
            return "failed"
      if pending:
        outcome = outcome or self._finish(*pending)
    finally:
      preemption.restore()
    if outcome == "diverged":
      self._status("diverged", f"non-finite train loss at step {self._diverged_step}",
                   self._diverged_step)
      return "diverged"
    self.writer.flush()
    if self.ckpt.latest_step() != step:
      self.ckpt.save(step, self.state, self.data_iter, dataclasses.asdict(self.loop), force=True)
    target = self.cfg.budget.target_loss
    if self.loop.target_step:
      reason = f"reached target loss {target} at step {self.loop.target_step}"
    elif target:
      reason = f"cap of {self.max_steps} steps reached before target loss {target}"
    else:
      reason = f"step budget {self.max_steps} used"
    self._status("done", reason, step)
    if self.is_main:
      print(f"done: {reason} → {self.workdir}", flush=True)
    return "done"

  def _stop_step(self) -> int | None:
    """After the target is reached, run `overshoot` more so smoothed curves cross it too."""
    t = self.loop.target_step
    return t + math.ceil(self.cfg.budget.overshoot * t) if t else None

  def _stop_due(self, step: int) -> bool:
    stop = self._stop_step()
    return stop is not None and step >= stop

  def _finish(self, step: int, train_metrics: dict[str, Any], eval_loss) -> str | None:
    """Fetches one step's metrics, writes its row; returns 'diverged' on a non-finite loss."""
    m = jax.device_get(train_metrics)
    now = time.perf_counter()
    dt = now - self._last_fetch if self._last_fetch is not None else float("nan")
    self._last_fetch = now
    loss = float(m["train_loss"])
    row = {"step": step, "tokens": step * self.derived["batch_tokens"], "train_loss": loss,
           "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), "step_time_s": dt,
           "tokens_per_s": self.derived["batch_tokens"] / dt if dt == dt else float("nan")}
    if eval_loss is not None:
      row["eval_loss"] = float(eval_loss)
    noise_columns = self._noise_columns(step, m)
    row.update(noise_columns)
    rare = eval_loss is not None or "b_noise_tokens" in row or any(
        k.startswith("ns_group/") for k in noise_columns)  # never drop cadenced measurements
    if step % self.cfg.log_every_steps == 0 or rare or not math.isfinite(loss):
      self.writer.write(row)
    if eval_loss is not None and self.is_main:
      speed = row["tokens_per_s"]  # none yet on the first step after a start
      speed = f"{speed:>8.0f} tokens/s" if math.isfinite(speed) else "       – tokens/s"
      print(f"step {step:>6}  tokens {row['tokens']:>11,}  train {loss:.4f}  eval "
            f"{row['eval_loss']:.4f}  B_simple {row.get('b_simple_tokens', float('nan')):>9.0f} "
            f"tokens  {speed}", flush=True)
    if not math.isfinite(loss):
      self._diverged_step = step
      return "diverged"
    self._track_target(step, loss)
    return None

  def _noise_columns(self, step: int, m: dict[str, Any]) -> dict[str, float]:
    if not self.sc.noise:
      return {}
    seq = self.cfg.seq_len
    cols = {k: float(m[k]) for k in ("ns_g_small_sq", "ns_g_big_sq", "ns_gsq", "ns_trace")}
    cols["b_simple_tokens"] = float(m["b_simple"])
    cols["b_simple_seqs"] = float(m["b_simple"]) / seq
    group_every = self.cfg.noise.group_every
    if group_every and step % group_every == 0:
      for key, value in m.items():
        if key.startswith("ns_group/") and key.endswith("/b_simple"):
          cols[key + "_tokens"] = float(value)
    if "b_noise" in m:  # Hessian-weighted, on its cadence; NaN (null) when GᵀHG ≤ 0
      cols.update({k: float(m[k]) for k in ("ns_q_small", "ns_q_big", "ns_ghg", "ns_trhs",
                                            "ns_b_noise_undefined")})
      cols["b_noise_tokens"] = float(m["b_noise"])
      cols["b_noise_seqs"] = float(m["b_noise"]) / seq
    return cols

  def _track_target(self, step: int, loss: float) -> None:
    b = self.cfg.budget
    if not b.target_loss:
      return
    d = self.loss_decay
    self.loop.loss_ema = d * self.loop.loss_ema + (1 - d) * loss
    self.loop.loss_ema_count += 1
    if not self.loop.target_step and self.loop.smoothed(d) <= b.target_loss:
      self.loop.target_step = step
