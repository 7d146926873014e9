"""Run configuration: arg parsing, validation before compiling, and values derived from it."""

import dataclasses
import math
from typing import Any

import ml_collections

from bscan import batch_schedule
from bscan import branching
from bscan import data as data_lib
from bscan import lr_scaling
from bscan import tasks
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")
LR_RULES = ("fixed", "kaplan")
DTYPES = ("float32", "bfloat16")


def parse_arg(arg: str) -> dict[str, Any]:
  """Parses 'size=3m,batch=64,lr=1e-3' into typed values (int, float, bool or str)."""
  out: dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ConfigError(f"config arg item {item!r} must look like key=value (e.g. batch=64)")
    key, value = (s.strip() for s in item.split("=", 1))
    out[key] = _typed(value)
  return out


def _typed(value: str) -> Any:
  if value.lower() in ("true", "false"):
    return value.lower() == "true"
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def check_arg_keys(args: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
  """Rejects arg keys that a config file does not read (a typo would silently do nothing)."""
  unknown = sorted(set(args) - set(allowed))
  if unknown:
    raise ConfigError(f"{where}: unknown arg key(s) {unknown}; allowed: {sorted(allowed)}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the global batch splits: over devices, then into K microbatches per device."""

  num_devices: int
  per_device: int  # sequences per device per step
  num_microbatches: int  # K per device
  microbatch: int  # sequences per microbatch

  @property
  def total_microbatches(self) -> int:
    return self.num_devices * self.num_microbatches


def layout(cfg: ml_collections.ConfigDict, num_devices: int, batch: int = 0) -> Layout:
  """Splits `batch` (default cfg.batch_size); microbatch_size 0 picks the largest ≤
  max_microbatch_size."""
  per_device = (batch or cfg.batch_size) // num_devices
  m = cfg.microbatch_size
  if m == 0:
    # Largest divisor of the per-device batch that fits the memory cap; at least two
    # microbatches in total so the noise-scale estimate exists even on one device.
    cap = min(cfg.max_microbatch_size, per_device if num_devices > 1 else max(1, per_device // 2))
    m = max(d for d in range(1, max(cap, 1) + 1) if per_device % d == 0)
  return Layout(num_devices, per_device, per_device // m, m)


def validate(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """The one check of a config before anything is built: ConfigError naming field and fix."""
  task = tasks.get(cfg)
  if branching.is_branch(cfg):
    branching.validate(cfg)
  _validate_layout(cfg, num_devices)
  _validate_ramp(cfg, num_devices, num_processes)
  task.validate()  # after the layout: reading the data's metadata is the slowest check
  if data_lib.num_shards(cfg) % num_processes:
    raise ConfigError(data_lib.shard_error(cfg, num_processes))


def _validate_layout(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  if cfg.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={cfg.model.dtype!r}; choose one of {DTYPES}")
  for field in ("seq_len", "batch_size"):
    if _get(cfg, field) <= 0:
      raise ConfigError(f"{field}={_get(cfg, field)} must be positive")
  if cfg.batch_size % num_devices:
    raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  m = cfg.microbatch_size
  if m < 0:
    raise ConfigError(f"microbatch_size={m} must be ≥ 0 (0 = automatic)")
  if m and (cfg.batch_size // num_devices) % m:
    raise ConfigError(
        f"batch_size={cfg.batch_size} is not divisible by devices × microbatch_size = "
        f"{num_devices} × {m}; use a batch_size multiple of {num_devices * m} or another "
        "microbatch_size")
  _validate_optim(cfg.optim, ramp=batch_schedule.Ramp.from_config(cfg) is not None)
  _validate_budget(cfg)
  for field in ("eval.every_steps", "eval.per_decade", "noise.group_every",
                "noise.hessian_every"):
    if _get(cfg, field) < 0:
      raise ConfigError(f"{field}={_get(cfg, field)} must be ≥ 0 (0 = off)")
  for field in ("log_every_steps", "checkpoint.every_steps", "checkpoint.keep",
                "data.eval_sequences"):
    if _get(cfg, field) < 1:
      raise ConfigError(f"{field}={_get(cfg, field)} must be ≥ 1")
  if cfg.data.eval_sequences % num_devices:
    raise ConfigError(f"data.eval_sequences={cfg.data.eval_sequences} must be a multiple of "
                      f"the {num_devices} devices (each evaluates its share)")
  if cfg.noise.hessian_every and not cfg.noise.enabled:
    raise ConfigError("noise.hessian_every needs noise.enabled=True (its columns are logged "
                      "beside B_simple)")
  if not 0.0 <= cfg.noise.ema_decay < 1.0:
    raise ConfigError(f"noise.ema_decay={cfg.noise.ema_decay} must be in [0, 1)")
  lay = layout(cfg, num_devices)
  if cfg.noise.hessian_every and (lay.num_microbatches < 2 or
                                  (lay.num_microbatches - 1) * num_devices < 2):
    raise ConfigError(
        "noise.hessian_every needs one held-out microbatch per device for H·v and ≥ 2 "
        f"gradient microbatches in all; this layout has {lay.num_microbatches} per device on "
        f"{num_devices} device(s): lower microbatch_size (≥ 3 microbatches per device on one "
        "device, ≥ 2 on several) or set noise.hessian_every=0")
  if cfg.noise.curvature not in ("hessian", "gauss_newton"):
    raise ConfigError(f"noise.curvature={cfg.noise.curvature!r}; use 'hessian' or "
                      "'gauss_newton'")


def _validate_ramp(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """A growing batch: what it needs of the rest of the config, and every batch's layout."""
  ramp = batch_schedule.Ramp.from_config(cfg)
  if ramp is None:
    return
  o = cfg.optim
  needs = [
      (cfg.task == "lm", f"task={cfg.task!r}: a ramp needs task='lm'"),
      (not branching.is_branch(cfg), "a branch run trains at one batch: clear ramp.*"),
      (o.schedule == "constant", f"optim.schedule={o.schedule!r}: a ramp needs 'constant' (a "
       "decay counted in steps changes meaning when the batch grows)"),
      (o.batch_scaling != "none" or o.declare_scaling,
       "optim.batch_scaling='none' keeps the learning rate fixed while the batch grows; set "
       "optim.batch_scaling='auto' (√ for adamw, linear for sgd), or optim.declare_scaling=True "
       "to keep it fixed on purpose"),
      (ramp.controller is None or cfg.noise.enabled, "ramp.controller='noise' follows the "
       "in-step noise scale: set noise.enabled=True"),
      (cfg.data.worker_count == 0, f"data.worker_count={cfg.data.worker_count}: grain workers "
       "batch their own rows, so the batch cannot change; set data.worker_count=0"),
      (ramp.first_change_tokens() >= o.warmup_tokens,
       f"the ramp's first change at {ramp.first_change_tokens()} tokens falls inside the "
       f"warmup (optim.warmup_tokens={o.warmup_tokens}); start it after the warmup"),
  ]
  for ok, message in needs:
    if not ok:
      raise ConfigError(message)
  batch_schedule.check_batches(list(ramp.batches()), num_devices, cfg.microbatch_size,
                               cfg.data.shards, num_processes)


def _validate_optim(optim: ml_collections.ConfigDict, ramp: bool = False) -> None:
  if optim.lr <= 0:
    raise ConfigError(f"optim.lr={optim.lr} must be positive")
  choices = {"optim.schedule": (optim.schedule, SCHEDULES),
             "optim.lr_rule": (optim.lr_rule, LR_RULES)}
  for field, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f"{field}={value!r} is unknown; choose one of {allowed}")
  rule = lr_scaling.resolve(optim.name, optim.batch_scaling, optim.declare_scaling)
  if rule != "none" and optim.reference_batch <= 0 and not ramp:
    raise ConfigError("optim.reference_batch must be positive when batch_scaling is on")
  if optim.clip_norm < 0 or optim.weight_decay < 0 or optim.warmup_tokens < 0:
    raise ConfigError("optim.clip_norm, optim.weight_decay, optim.warmup_tokens must be ≥ 0")


def _validate_budget(cfg: ml_collections.ConfigDict) -> None:
  b = cfg.budget
  if b.train_tokens < 0 or b.train_steps < 0 or b.max_tokens < 0:
    raise ConfigError("budget.train_tokens, budget.train_steps and budget.max_tokens must be "
                      "≥ 0 (0 = unset)")
  if b.smoothing_tokens <= 0:
    raise ConfigError(f"budget.smoothing_tokens={b.smoothing_tokens} must be positive")
  if b.overshoot < 0:
    raise ConfigError(f"budget.overshoot={b.overshoot} must be ≥ 0")
  if b.diverge_margin <= 0 or b.diverge_patience < 0:
    raise ConfigError(f"budget.diverge_margin={b.diverge_margin} must be positive and "
                      f"budget.diverge_patience={b.diverge_patience} ≥ 0 (0 = only NaN/inf)")
  if b.target_loss:
    if b.target_loss < 0:
      raise ConfigError(f"budget.target_loss={b.target_loss} must be positive")
    if cfg.optim.schedule != "constant":
      raise ConfigError(
          f"budget.target_loss with optim.schedule={cfg.optim.schedule!r}: the decay would be "
          "tied to the cap, so steps-to-target would depend on the planned run length; use "
          "optim.schedule='constant' for scans")
    if not (b.max_tokens or b.train_steps):
      raise ConfigError("budget.target_loss needs a cap: set budget.max_tokens (or "
                        "budget.train_steps)")
  elif not (b.train_tokens or b.train_steps):
    raise ConfigError("no budget: set budget.train_tokens, budget.train_steps, or "
                      "budget.target_loss with budget.max_tokens")


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def batch_tokens(cfg: ml_collections.ConfigDict) -> int:
  """Tokens per optimizer step: the global batch in tokens."""
  return cfg.batch_size * cfg.seq_len


def max_steps(cfg: ml_collections.ConfigDict) -> int:
  """The step budget (a cap when the run stops on a target loss); tokens → steps here only."""
  b = cfg.budget
  if b.train_steps:
    return b.train_steps
  tokens = b.max_tokens if b.target_loss else b.train_tokens
  return math.ceil(tokens / batch_tokens(cfg))


def warmup_steps(cfg: ml_collections.ConfigDict) -> int:
  """Warmup in steps, from a token budget so that every batch size warms up on equal data."""
  return min(max_steps(cfg), math.ceil(cfg.optim.warmup_tokens / batch_tokens(cfg)))


def kaplan_lr(n_params: int) -> float:
  """Kaplan et al. 2020 eq. D.1: LR(N) ≈ 0.003239 − 0.0001395·log N."""
  return 0.003239 - 0.0001395 * math.log(n_params)


def peak_learning_rate(cfg: ml_collections.ConfigDict, n_params: int) -> float:
  """optim.lr, or the model-size rule, times the declared batch-size scaling."""
  lr = kaplan_lr(n_params) * cfg.optim.lr_scale if cfg.optim.lr_rule == "kaplan" else cfg.optim.lr
  # A ramp's stages set reference_batch to its first batch (batch_schedule.stage_config).
  ratio = cfg.batch_size / cfg.optim.reference_batch if cfg.optim.reference_batch else 1.0
  o = cfg.optim
  return lr_scaling.scaled(lr, ratio, lr_scaling.resolve(o.name, o.batch_scaling,
                                                        o.declare_scaling))


def plan(cfg: ml_collections.ConfigDict, arg: str, shape: tasks.Shape, num_devices: int,
         num_processes: int = 1, backend: str = "", device_kind: str = "") -> workdir_lib.RunPlan:
  """Everything derived from a (validated) config and the task's shape: the run's typed plan."""
  lay = layout(cfg, num_devices)
  steps = max_steps(cfg)
  return workdir_lib.RunPlan(
      arg=arg, size=cfg.model.size, n_params=shape.n_params,
      n_params_embedding=shape.n_params_embedding, n_layer=shape.n_layer,
      d_model=shape.d_model, seq_len=cfg.seq_len, batch_sequences=cfg.batch_size,
      batch_tokens=batch_tokens(cfg),
      learning_rate=peak_learning_rate(cfg, shape.n_params),
      seed=cfg.seed, num_devices=num_devices, per_device_sequences=lay.per_device,
      num_microbatches=lay.num_microbatches, microbatch_sequences=lay.microbatch,
      microbatch_tokens=lay.microbatch * cfg.seq_len, warmup_steps=warmup_steps(cfg),
      max_steps=steps, max_tokens=steps * batch_tokens(cfg),
      target_loss=cfg.budget.target_loss or None, vocab_size=shape.vocab_size,
      dataset=shape.dataset, tokenizer=shape.tokenizer,
      corpus_fingerprint=shape.corpus_fingerprint, num_processes=num_processes,
      data_shards=data_lib.num_shards(cfg), backend=backend, device_kind=device_kind)
