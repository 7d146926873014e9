"""The training loop: one run of one config in one workdir, resumable, with a stop condition."""

import dataclasses
import json
import math
import secrets
import signal
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from bscan import batch_schedule
from bscan import branching
from bscan import checkpoint as checkpoint_lib
from bscan import config as config_lib
from bscan import data as data_lib
from bscan import noise_scale
from bscan import optim
from bscan import ramp_branches
from bscan import run as run_lib
from bscan import tasks
from bscan import train_step as step_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError


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


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run to train: its config, its workdir and the config-file arg it came from."""

  cfg: ml_collections.ConfigDict
  workdir: epath.Path
  arg: str = ""


# Fields that may differ between runs packed into one step: the rest fixes the step's shapes
# and math (model, batch, layout, data, schedule shape).
PACKABLE_FIELDS = ("seed", "optim.lr", "branch.replicate")
PACKABLE_PREFIXES = ("budget.", "checkpoint.")


def check_packable(specs: list[RunSpec]) -> None:
  """Runs packed into one step must share all but their seed, learning rate and budget."""
  if len({str(s.workdir) for s in specs}) < len(specs):
    raise ConfigError(f"packed runs need one workdir each; got {[str(s.workdir) for s in specs]}")
  first = _flatten(json.loads(specs[0].cfg.to_json()))
  for spec in specs[1:]:
    other = _flatten(json.loads(spec.cfg.to_json()))
    diffs = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k)
                   and k not in PACKABLE_FIELDS and not k.startswith(PACKABLE_PREFIXES))
    if diffs:
      raise ConfigError(
          f"runs {specs[0].arg!r} and {spec.arg!r} cannot train packed: they differ in "
          f"{diffs[:6]}; only {', '.join(PACKABLE_FIELDS)}, budget.* and checkpoint.* may "
          "differ (run them in separate packs)")


def run(cfg: ml_collections.ConfigDict, workdir: epath.PathLike, arg: str = "",
        allow_config_change: bool = False) -> str:
  """Trains (or resumes) one run; returns its final status (done / diverged / preempted).

  Every input is checked before anything is built (config, data, tokenizer settings, the
  workdir and the config it holds): a ConfigError names the field or file and the fix.
  """
  return run_packed([RunSpec(cfg, epath.Path(workdir), arg)], allow_config_change)[0]


def run_packed(specs: list[RunSpec], allow_config_change: bool = False) -> list[str]:
  """Trains runs of one shape together, one vmapped step for all; their statuses in order.

  Each run keeps its own workdir, data order, checkpoints, rows and stop step, equal to its
  solo run's; a run that stops leaves the pack and the others train on.
  """
  num_devices = jax.device_count()
  for spec in specs:
    config_lib.validate(spec.cfg, num_devices, jax.process_count())
    workdir_lib.check_usable(spec.workdir)
    check_shared_workdir(spec.workdir)
    check_workdir(spec.workdir, spec.cfg, allow_config_change)
    if branching.is_branch(spec.cfg):
      branching.check_reference(spec.cfg, spec.workdir, data_lib.num_shards(spec.cfg))
  check_packable(specs)
  if len(specs) > 1 and batch_schedule.Ramp.from_config(specs[0].cfg):
    raise ConfigError("runs with a batch ramp (ramp.*) train one per process: their batches "
                      "part ways; run them without --pack")
  statuses = [_previous_final_status(s.workdir) for s in specs]
  todo = [s for s, status in zip(specs, statuses) if status is None]
  if not todo:
    return statuses

  is_main = jax.process_index() == 0
  task = tasks.get(todo[0].cfg)
  if jax.process_count() > 1:  # hosts may share a data dir: one builds, then all read
    if is_main:
      task.prepare()
    multihost_utils.sync_global_devices("bscan_data_prepared")
  shape = task.shape()
  device = jax.devices()[0]
  plans = [config_lib.plan(s.cfg, s.arg, shape, num_devices, jax.process_count(),
                           jax.default_backend(), device.device_kind) for s in todo]
  if is_main:
    p = plans[0]
    print(f"JAX {jax.__version__} on {p.backend}: {num_devices} × {p.device_kind} in "
          f"{p.num_processes} process(es); batch {p.batch_sequences} = "
          f"{p.data_shards} data shard(s)" + (f"; {len(todo)} runs packed" if len(todo) > 1
                                                else ""), flush=True)
    for spec, plan in zip(todo, plans):
      workdir_lib.write_config(spec.workdir, json.loads(spec.cfg.to_json()), spec.arg, plan)
  runs: list[run_lib.Run] = []
  try:
    runs = [run_lib.Run(s.cfg, s.workdir, plan, tasks.get(s.cfg))
            for s, plan in zip(todo, plans)]
    trainer = Trainer(runs, task.model(shape), task.eval_batches())
    ended = iter(trainer.train())
  except Exception as e:  # Recorded for the launcher and the analysis, then re-raised.
    for r in runs:
      if not r.ended:
        r.write_status(workdir_lib.FAILED, f"{type(e).__name__}: {e}", r.step)
    if not runs and is_main:
      for spec in todo:
        workdir_lib.write_status(spec.workdir, workdir_lib.FAILED, f"{type(e).__name__}: {e}", 0, 0)
    raise
  finally:
    for r in runs:
      r.close()
  return [status or next(ended) for status in statuses]


def _previous_final_status(workdir: epath.Path) -> str | None:
  """'done' or 'diverged' when the workdir holds a finished run (said once), else None."""
  status = _saved_status(workdir)
  finished = status in workdir_lib.FINAL_STATES
  if jax.process_count() > 1:  # process 0 wrote it; workers may not see the same disk
    finished = bool(multihost_utils.broadcast_one_to_all(np.array(finished)))
    status = status if finished else None
  if not finished:
    return None
  if jax.process_index() == 0:
    print(f"{workdir}: already {status}; nothing to do (use a new --workdir to train again)",
          flush=True)
  return status


def _optimizer_at(cfg: ml_collections.ConfigDict, peak) -> tuple[Any, Any]:
  """The run's optimizer and schedule at peak learning rate `peak` (a float or traced)."""
  lr = optim.schedule(cfg, peak)
  return optim.optimizer(cfg, lr), lr


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """The step (and Hessian products) for one global batch."""

  sc: step_lib.StepConfig
  train_step: Any
  hessian_fn: Any


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics are not fetched yet: which runs, and their outputs."""

  live: list[int]  # run indices, in stack order
  steps: list[int]
  batch: int  # sequences: the step's global batch
  metrics: dict[str, Any]
  hessian: dict[str, Any]
  hessian_runs: set[int]
  eval_loss: Any
  eval_runs: set[int]


class Trainer:
  """Builds mesh, model, step and eval once for runs of one shape, then loops over them.

  One run trains with the plain step; several (a pack) with jit(vmap(step)) over their
  stacked states, each at its own peak learning rate.
  """

  def __init__(self, runs: list[run_lib.Run], model: tasks.Model, eval_batches: np.ndarray):
    self.runs = runs
    self.packed = len(runs) > 1
    cfg, plan = runs[0].cfg, runs[0].plan
    self.cfg = cfg
    self.mesh = step_lib.make_mesh()
    self.model = model
    self.loss_fn = model.loss_fn
    self._compiled: dict[int, _Compiled] = {}
    optimizer_at = lambda peak: _optimizer_at(cfg, peak)
    if self.packed:
      for r in runs:
        r.label = f"{r.plan.arg or r.workdir}: "
    self.sc = self.compiled(plan.batch_sequences).sc
    groups = noise_scale.param_groups(jax.eval_shape(model.init_params, jax.random.key(0)),
                                      model.group_of)
    self._init = lambda run: step_lib.init_state(
        model.init_params, optimizer_at(run.plan.learning_rate)[0],
        jax.random.key(run.cfg.seed), self.mesh, groups)
    self.batch_sharding = NamedSharding(self.mesh, P(None, "data") if self.packed else P("data"))
    eval_tokens = eval_batches  # the same on every process and run
    self.eval_tokens = jax.make_array_from_callback(
        eval_tokens.shape, NamedSharding(self.mesh, P("data")), lambda index: eval_tokens[index])
    chunk = math.gcd(len(eval_tokens) // plan.num_devices, plan.microbatch_sequences)
    self.eval_fn = step_lib.make_eval_fn(self.loss_fn, self.mesh, chunk, packed=self.packed)
    replicated = NamedSharding(self.mesh, P())
    # Stack and select on the mesh, replicated like the step's own state.
    self._stack = jax.jit(lambda states: jax.tree.map(lambda *x: jnp.stack(x), *states),
                          out_shardings=replicated)
    self._select = jax.jit(lambda state, idx: jax.tree.map(lambda x: x[idx], state),
                           out_shardings=replicated)

  def compiled(self, batch: int) -> _Compiled:
    """The step for a global batch of `batch` sequences, built on first use: a ramp's stage
    has its own microbatch count, learning rate and β2 (bscan.batch_schedule.stage_config)."""
    if batch in self._compiled:
      return self._compiled[batch]
    run = self.runs[0]
    cfg = self.cfg
    if batch != run.plan.batch_sequences:
      cfg = batch_schedule.stage_config(cfg, batch)
    lay = config_lib.layout(cfg, run.plan.num_devices)
    sc = step_lib.StepConfig(
        num_microbatches=lay.num_microbatches, microbatch=lay.microbatch,
        seq_len=run.plan.seq_len, num_devices=run.plan.num_devices, noise=cfg.noise.enabled,
        ema_decay=cfg.noise.ema_decay, group_of=self.model.group_of)
    optimizer_at = lambda peak: _optimizer_at(cfg, peak)
    if self.packed:
      train_step = step_lib.make_packed_train_step(self.loss_fn, optimizer_at, sc, self.mesh)
    else:
      peak = config_lib.peak_learning_rate(cfg, run.plan.n_params)
      if batch == run.plan.batch_sequences:
        peak = run.plan.learning_rate
      tx, lr = optimizer_at(peak)
      train_step = step_lib.make_train_step(self.loss_fn, tx, lr, sc, self.mesh)
    hessian_fn = None
    if cfg.noise.hessian_every:
      hessian_fn = step_lib.make_hessian_fn(self.loss_fn, sc, self.mesh, self.model.curvature,
                                            packed=self.packed)
    self._compiled[batch] = _Compiled(sc, train_step, hessian_fn)
    return self._compiled[batch]

  def _state_of(self, state: Any, k: int) -> Any:
    """Run k's state (of the current stack), as its solo run holds it."""
    return self._select(state, np.int32(k)) if self.packed else state

  def train(self) -> list[str]:
    """The loop: dispatch step n, then fetch step n−1's metrics (never block needlessly).

    Returns each run's final status, in order.
    """
    runs = self.runs
    states = []
    for run in runs:
      fresh = self._init(run)
      restored = run.restore(checkpoint_lib.abstract(fresh))
      states.append(fresh if restored is None else restored)
      run.write_status(workdir_lib.RUNNING, "", run.step)
    if self.sc.noise and self.sc.b_small == self.sc.b_big:
      logging.warning("Noise scale undefined: one device and one microbatch (B_small = B_big); "
                      "set microbatch_size below batch_size to measure it. Training on.")
    state = self._stack(states) if self.packed else states[0]
    del states
    self.shared_data = self.packed and run_lib.share_data(runs)
    if self.shared_data and runs[0].is_main:
      print(f"{len(runs)} packed runs read one data stream (same seed and position)", flush=True)
    live = list(range(len(runs)))
    preemption = _Preemption()
    pending = None
    try:
      while True:
        want = [i for i in live if runs[i].wants_step()]
        # A run that stops leaves the pack: its state is copied out before the step donates it.
        ending = [(i, self._state_of(state, k)) for k, i in enumerate(live) if i not in want]
        if want and ending:
          state = self._select(state, np.array([live.index(i) for i in want], np.int32))
        live = want
        if not live:
          if pending:
            self._finish(pending)
          for i, s in ending:
            runs[i].end(s)
          break
        if not self.packed and ramp_branches.due(runs[live[0]]):
          if pending:
            self._finish(pending)
            pending = None
          state = ramp_branches.test(self, runs[live[0]], state)
          continue  # the kept branch's steps may have ended the run
        state, pending, previous = self._dispatch(state, live, pending)
        if previous:
          self._finish(previous)
        for i, s in ending:
          runs[i].end(s)
        del ending
        preempted = preemption.agreed(runs[live[0]].step)
        due = [k for k, i in enumerate(live)
               if preempted or runs[i].step % runs[i].cfg.checkpoint.every_steps == 0]
        if due:
          self._finish(pending)
          pending = None
          for k in due:
            i = live[k]
            if preempted:
              runs[i].preempt(self._state_of(state, k))
            elif not runs[i].diverged:
              runs[i].save(self._state_of(state, k))
          if preempted:
            return [r.ended for r in runs]
    finally:
      preemption.restore()
    return [r.ended for r in runs]

  def _dispatch(self, state: Any, live: list[int], pending: _Pending | None):
    """Dispatches one step of the live runs (and their due evals); returns the new state,
    the step's _Pending and the previous one (to fetch now)."""
    runs = [self.runs[i] for i in live]
    size = runs[0].next_batch_size()  # a ramp trains alone (packs share one batch)
    compiled = self.compiled(size)
    if self.shared_data:  # one stream for the pack: read once, every run gets the batch
      batch = runs[0].next_batch(size)
      local = np.ascontiguousarray(np.broadcast_to(batch, (len(runs), *batch.shape)))
    else:
      local = [r.next_batch(size) for r in runs]
      local = np.stack(local) if self.packed else local[0]
    batch = jax.make_array_from_process_local_data(self.batch_sharding, local)
    hessian, hessian_runs = {}, set()
    every = self.cfg.noise.hessian_every
    if compiled.hessian_fn:
      hessian_runs = {i for i, r in zip(live, runs) if (r.step + 1) % every == 0}
      if hessian_runs:  # on the params this step uses
        hessian = compiled.hessian_fn(state.params, batch)
    if self.packed:
      peaks = np.array([r.plan.learning_rate for r in runs], np.float32)
      state, metrics = compiled.train_step(state, batch, peaks)
    else:
      state, metrics = compiled.train_step(state, batch)
    for r in runs:
      r.step += 1
      r.tokens += size * r.plan.seq_len
    eval_runs = {i for i, r in zip(live, runs) if eval_due(r.step, self.cfg) or r.last_step()}
    eval_loss = self.eval_fn(state.params, self.eval_tokens) if eval_runs else None
    new = _Pending(list(live), [r.step for r in runs], size, metrics, hessian, hessian_runs,
                   eval_loss, eval_runs)
    return state, new, pending

  def _finish(self, p: _Pending) -> None:
    """Fetches a dispatched step's metrics and hands each run its row."""
    metrics, hessian, eval_loss = jax.device_get((p.metrics, p.hessian, p.eval_loss))
    for k, (i, step) in enumerate(zip(p.live, p.steps)):
      pick = (lambda x: x[k]) if self.packed else (lambda x: x)
      m = {key: pick(v) for key, v in metrics.items()}
      if i in p.hessian_runs:
        m.update({key: pick(v) for key, v in hessian.items()})
      self.runs[i].finish(step, m, pick(eval_loss) if i in p.eval_runs else None, p.batch)
