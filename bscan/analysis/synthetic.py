"""Synthetic batch-size scans with a known critical batch size, in the workdir format.

Ground truth (Kaplan §5.1): a model of size N reaches loss L after S_min(L) steps at infinite
batch, where L = L_inf(N) + A * S_min^(-a); B_crit(L) = B* * L^(-1/alpha_B) depends on L only;
E_min(L) = B_crit(L) * S_min(L); a run at batch B reaches L after S(B) = S_min + E_min/B steps.
Each run's curve is that model inverted, with run-to-run multiplicative noise on its time scale
(seeds), per-step loss noise, a slower learning rate when asked, and a noise-scale column
B_simple ~ B_crit(L) with log-normal scatter (and, when asked, B_noise ~ b_noise_ratio * B_crit(L)
from noisy terms tr(H Sigma) and G^T H G on a cadence). Used by the tests, the notebook's demo mode
and to try the analysis without a sweep.

Branches (write_branches): loss is the state, so a branch from a checkpoint at true loss L0,
trained Δ tokens at batch k*B, follows the batch-k*B curve from where it reaches L0; its final
loss, and with it the local critical batch size for an ε, is known exactly (true_local_cbs).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import numpy as np
import pandas as pd
from etils import epath

from bscan import sweep as sweep_lib
from bscan import workdir as wd
from bscan.analysis import load

Col = wd.Col


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """One model size of the synthetic ladder: name, non-embedding N and irreducible loss."""

  name: str
  n_params: int
  loss_floor: float


@dataclasses.dataclass(frozen=True)
class Truth:
  """The ground-truth S_min(L), E_min(L) model; batches in tokens, losses in nats/token."""

  b_star: float = 3.2e5
  alpha_b: float = 0.25
  amplitude: float = 4.0  # A in L = L_inf + A * S_min^(-a)
  exponent: float = 0.3  # a
  initial_loss: float = 5.545  # ln(256): a byte-level model at initialisation

  def b_crit(self, loss: np.ndarray | float) -> np.ndarray:
    """True critical batch size (tokens) at loss L."""
    return self.b_star * np.asarray(loss, float) ** (-1.0 / self.alpha_b)

  def s_min(self, loss: np.ndarray | float, size: ModelSize) -> np.ndarray:
    """Steps to reach L at infinite batch size (inf below the model's floor)."""
    excess = np.asarray(loss, float) - size.loss_floor
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(excess > 0, (excess / self.amplitude) ** (-1.0 / self.exponent), np.inf)

  def e_min(self, loss: np.ndarray | float, size: ModelSize) -> np.ndarray:
    """Tokens to reach L at vanishing batch size."""
    return self.b_crit(loss) * self.s_min(loss, size)

  def steps(self, loss: np.ndarray | float, batch_tokens: float, size: ModelSize) -> np.ndarray:
    """Steps to reach L at batch size B (tokens): S_min + E_min/B."""
    return self.s_min(loss, size) + self.e_min(loss, size) / batch_tokens

  def loss_at(self, step: np.ndarray, batch_tokens: float, size: ModelSize,
              time_scale: float = 1.0) -> np.ndarray:
    """Noise-free loss after `step` steps: the inverse of time_scale * steps(L, B)."""
    s_grid = np.geomspace(1e-3, 1e9, 4000)  # S_min values; L decreases along the grid
    l_grid = size.loss_floor + self.amplitude * s_grid ** (-self.exponent)
    t_grid = time_scale * self.steps(l_grid, batch_tokens, size)
    loss = np.interp(np.log(step), np.log(t_grid), l_grid)
    return np.minimum(loss, self.initial_loss)


DEFAULT_SIZES = (ModelSize("1m", 1_000_000, 1.45), ModelSize("3m", 3_200_000, 1.30),
                 ModelSize("10m", 10_000_000, 1.15))


@dataclasses.dataclass(frozen=True)
class Scan:
  """A synthetic sweep: which runs exist and how noisy they are."""

  truth: Truth = Truth()
  sizes: tuple[ModelSize, ...] = DEFAULT_SIZES
  batch_sequences: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
  seq_len: int = 128
  # learning rate -> slowdown of the time scale (1.0 = the best learning rate)
  learning_rates: tuple[tuple[float, float], ...] = ((1e-3, 1.0),)
  seeds: tuple[int, ...] = (0,)
  targets: tuple[float, ...] = (1.6, 1.7, 1.8, 1.9, 2.0, 2.2)
  run_noise: float = 0.04  # s.d. of log time scale between runs (seed-to-seed variation)
  loss_noise: float = 0.015  # s.d. of a logged train loss at 8192 tokens per batch
  noise_scale_scatter: float = 0.3  # s.d. of log B_simple around B_crit(L)
  max_steps: int = 300_000  # the cap for runs that never reach the lowest target
  points_per_efold: int = 60  # logging density after the first 100 steps
  b_noise_every: int = 0  # B_noise terms on every n-th logged step from step 10 (0: none)
  b_noise_ratio: float = 0.5  # B_noise / B_crit(L)
  b_noise_term_noise: float = 0.3  # relative s.d. of one step's tr(H Sigma) and G^T H G


def log_steps(last: int, points_per_efold: int) -> np.ndarray:
  """Logged steps: every step up to 100, then `points_per_efold` per e-fold, and `last`."""
  dense = np.arange(1, min(last, 100) + 1)
  top = max(last, 100)
  sparse = np.geomspace(100, top, max(2, int(points_per_efold * np.log(top / 100))))
  return np.unique(np.concatenate([dense, np.round(sparse), [last]]).astype(np.int64))


def simulate_curves(scan: Scan, size: ModelSize, batch_tokens: int, slowdown: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Curves of one synthetic run in the loader's format (train, eval, noise scale)."""
  truth = scan.truth
  time_scale = slowdown * float(np.exp(scan.run_noise * rng.standard_normal()))
  lowest = min(scan.targets) - 0.03  # a scan run stops once it is past the lowest target
  need = time_scale * float(truth.steps(lowest, batch_tokens, size)) * 1.1
  last = int(min(need, scan.max_steps)) if np.isfinite(need) else scan.max_steps
  step = log_steps(max(last, 20), scan.points_per_efold).astype(float)
  clean = truth.loss_at(step, batch_tokens, size, time_scale)
  sd = scan.loss_noise * np.sqrt(8192.0 / batch_tokens)  # per-batch loss noise ~ 1/sqrt(B)
  train = clean + sd * rng.standard_normal(len(step))
  is_eval = np.zeros(len(step), bool)
  is_eval[np.unique(np.round(np.geomspace(1, len(step), 40)).astype(int) - 1)] = True
  eval_loss = clean[is_eval] + 0.01 + 0.003 * rng.standard_normal(is_eval.sum())
  b_simple = truth.b_crit(clean) * np.exp(scan.noise_scale_scatter * rng.standard_normal(len(step)))
  b_simple[step < 10] = np.nan  # the EMA ratio is undefined during its first steps
  curves = {Col.STEP: step, Col.TOKENS: step * batch_tokens, Col.TRAIN_LOSS: train,
            load.EVAL_STEP: step[is_eval], Col.EVAL_LOSS: eval_loss, Col.B_SIMPLE_TOKENS: b_simple}
  return {**curves, **_b_noise_terms(scan, step, clean, rng)}


def _b_noise_terms(scan: Scan, step: np.ndarray, clean: np.ndarray, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
  """B_noise and its terms on the cadence (NaN elsewhere); no random draws when it is off."""
  nan = np.full(len(step), np.nan)
  if not scan.b_noise_every:
    return {Col.B_NOISE_TOKENS: nan, Col.TRHS: nan, Col.GHG: nan}
  on = np.zeros(len(step), bool)
  on[np.flatnonzero(step >= 10)[::scan.b_noise_every]] = True
  ghg = 1.0 + scan.b_noise_term_noise * rng.standard_normal(on.sum())  # G^T H G, arbitrary units
  trhs = scan.b_noise_ratio * scan.truth.b_crit(clean[on]) * (
      1.0 + scan.b_noise_term_noise * rng.standard_normal(on.sum()))
  b_noise, terms_h, terms_g = nan.copy(), nan.copy(), nan.copy()
  terms_h[on], terms_g[on] = trhs, ghg
  b_noise[on] = np.where(ghg > 0, trhs / ghg, np.nan)  # undefined where G^T H G <= 0
  return {Col.B_NOISE_TOKENS: b_noise, Col.TRHS: terms_h, Col.GHG: terms_g}


def run_plan(scan: Scan, size: ModelSize, batch_sequences: int, lr: float, seed: int
             ) -> wd.RunPlan:
  """The run plan (config.json `derived`) of one synthetic run."""
  return wd.RunPlan(
      arg=f"size={size.name},batch={batch_sequences},lr={lr:g},seed={seed}", size=size.name,
      n_params=size.n_params, n_params_embedding=256 * 128, n_layer=2, d_model=128,
      seq_len=scan.seq_len, batch_sequences=batch_sequences,
      batch_tokens=batch_sequences * scan.seq_len, learning_rate=lr, seed=seed, num_devices=1,
      per_device_sequences=batch_sequences, num_microbatches=batch_sequences,
      microbatch_sequences=1, microbatch_tokens=scan.seq_len, warmup_steps=10,
      max_steps=scan.max_steps, max_tokens=scan.max_steps * batch_sequences * scan.seq_len,
      target_loss=min(scan.targets), vocab_size=256, dataset="synthetic", tokenizer="bytes")


def run_config(scan: Scan, size: ModelSize, batch_sequences: int, seed: int) -> dict:
  """The config part of config.json of one synthetic run (a stand-in for the trainer's)."""
  return {"seed": seed, "seq_len": scan.seq_len, "batch_size": batch_sequences,
          "model": {"size": size.name}, "data": {"name": "synthetic"},
          "tokenizer": {"name": "bytes"}}


def _points(scan: Scan):
  for size in scan.sizes:
    for b in scan.batch_sequences:
      for lr, slowdown in scan.learning_rates:
        for seed in scan.seeds:
          yield size, b, lr, slowdown, seed


def relpath(size: ModelSize, batch_sequences: int, lr: float, seed: int) -> str:
  """A run's workdir in its sweep, as the launchers name it: '3m/b64/lr1e-3/s0'."""
  return sweep_lib.point_relpath({"size": size.name, "batch": batch_sequences, "lr": lr,
                                  "seed": seed})


def simulate_runs(scan: Scan = Scan(), seed: int = 0) -> pd.DataFrame:
  """The runs table of a synthetic sweep, built in memory (no files)."""
  rng = np.random.default_rng(seed)
  rows = []
  for size, b, lr, slowdown, run_seed in _points(scan):
    curves = simulate_curves(scan, size, b * scan.seq_len, slowdown, rng)
    last = int(curves[Col.STEP][-1])
    status = wd.Status(wd.DONE, "reached target", last, last * b * scan.seq_len)
    plan = run_plan(scan, size, b, lr, run_seed)
    rows.append(load.run_row(dataclasses.asdict(plan), curves, status,
                             workdir=relpath(size, b, lr, run_seed)))
  return load.runs_table(rows)


def metric_rows(curves: dict[str, np.ndarray]) -> list[dict]:
  """Per-step metric rows as the trainer logs them (a subset of its columns)."""
  evals = dict(zip(curves[load.EVAL_STEP].tolist(), curves[Col.EVAL_LOSS].tolist()))
  out = []
  for i, s in enumerate(curves[Col.STEP].tolist()):
    row = {Col.STEP: int(s), Col.TOKENS: int(curves[Col.TOKENS][i]),
           Col.TRAIN_LOSS: float(curves[Col.TRAIN_LOSS][i]), Col.LR: 1e-3, Col.GRAD_NORM: 1.0,
           Col.B_SIMPLE_TOKENS: float(curves[Col.B_SIMPLE_TOKENS][i])}  # NaN is written as null
    for key in (Col.B_NOISE_TOKENS, Col.TRHS, Col.GHG):  # on the B_noise cadence only
      if key in curves and np.isfinite(curves[key][i]):
        row[key] = float(curves[key][i])
    if s in evals:
      row[Col.EVAL_LOSS] = evals[s]
    out.append(row)
  return out


def write_run(workdir: epath.PathLike, plan: wd.RunPlan, config: dict, rows: list[dict],
              status: wd.Status | None) -> epath.Path:
  """Writes a run's files through bscan.workdir, the trainer's own writers."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  wd.write_config(path, config, plan.arg, plan)
  writer = wd.MetricsWriter(path, tensorboard=False)
  for row in rows:
    writer.write(row)
  writer.close()
  if status is not None:
    wd.write_status(path, status.status, status.reason, status.step, status.tokens)
  return path


def _damage(path: epath.Path, edit) -> None:
  """Rewrites a run file with `edit(text)`: what a kill or a careless edit leaves."""
  path.write_text(edit(path.read_text()))


def _replace_line(text: str, index: int, line: str) -> str:
  lines = text.splitlines(keepends=True)
  lines[index] = line + "\n"
  return "".join(lines)


def write_sweep(root: epath.PathLike, scan: Scan = Scan(), seed: int = 0,
                messy: bool = True) -> epath.Path:
  """Writes a synthetic sweep as a launcher lays it out: ROOT/sweep.json and one workdir a point.

  With `messy`, the sweep also has what real, finished sweeps have: a run killed mid-write
  after reaching every target (truncated last line, status 'running'), a run without
  status.json, a metrics line that is not an object, a diverged run at a too-high learning
  rate, and a point whose config.json is damaged.
  """
  root = epath.Path(root)
  rng = np.random.default_rng(seed)
  points = []
  for i, (size, b, lr, slowdown, run_seed) in enumerate(_points(scan)):
    curves = simulate_curves(scan, size, b * scan.seq_len, slowdown, rng)
    last = int(curves[Col.STEP][-1])
    status = wd.Status(wd.DONE, "reached target loss", last, last * b * scan.seq_len)
    if messy and i == 1:
      status = dataclasses.replace(status, status=wd.RUNNING, reason="")
    if messy and i == 2:
      status = None
    path = write_run(root / relpath(size, b, lr, run_seed), run_plan(scan, size, b, lr, run_seed),
                     run_config(scan, size, b, run_seed), metric_rows(curves), status)
    if messy and i == 1:  # killed while writing its last line
      _damage(path / wd.METRICS, lambda t: t[:-len(t.splitlines()[-1]) // 2])
    if messy and i == 3:  # valid JSON, not an object
      _damage(path / wd.METRICS, lambda t: _replace_line(t, 50, "[1, 2]"))
    points.append((size, b, lr, run_seed))
  if messy:
    size, b = scan.sizes[-1], scan.batch_sequences[-1]
    lr = 10 * max(lr for lr, _ in scan.learning_rates)
    curves = simulate_curves(scan, size, b * scan.seq_len, 1.3, rng)
    cut = len(curves[Col.STEP]) // 3
    rows = metric_rows({k: v if k in (load.EVAL_STEP, Col.EVAL_LOSS) else v[:cut]
                        for k, v in curves.items()})
    rows = [r for r in rows if r[Col.STEP] <= curves[Col.STEP][cut - 1]]
    for r in rows[-5:]:  # loss blows up, then NaN (written as null)
      r[Col.TRAIN_LOSS] *= 3.0
    step = rows[-1][Col.STEP] + 1
    rows.append({Col.STEP: step, Col.TRAIN_LOSS: math.nan})
    plan = run_plan(scan, size, b, lr, 0)
    write_run(root / relpath(size, b, lr, 0), plan, run_config(scan, size, b, 0), rows,
              wd.Status(wd.DIVERGED, "non-finite loss", step, step * plan.batch_tokens))
    damaged = write_run(root / relpath(size, b, lr, 1), run_plan(scan, size, b, lr, 1),
                        run_config(scan, size, b, 1), [], None)
    _damage(damaged / wd.CONFIG, lambda t: t[: len(t) // 2])  # e.g. a disk that filled up
    points += [(size, b, lr, 0), (size, b, lr, 1)]
  sweep = sweep_lib.Sweep(points=[{"size": z.name, "batch": b, "lr": lr, "seed": s}
                                  for z, b, lr, s in points], targets=scan.targets)
  sweep_lib.write_sweep_json("synthetic", sweep, str(root))
  return root


DEMO_SCAN = Scan(sizes=DEFAULT_SIZES[1:], batch_sequences=(8, 16, 32, 64, 128, 256, 512))


def write_demo_sweep(root: epath.PathLike | None = None) -> str:
  """Writes a small messy synthetic sweep (two model sizes) and returns its path."""
  root = root or tempfile.mkdtemp(prefix="bscan_demo_sweep_")
  return str(write_sweep(root, DEMO_SCAN, seed=0, messy=True))


@dataclasses.dataclass(frozen=True)
class Branching:
  """Synthetic branches from one reference run: checkpoints, multiples k, replicates and Δ."""

  size: ModelSize = DEFAULT_SIZES[1]
  batch_sequences: int = 16  # the reference's batch
  learning_rate: float = 1e-3  # the reference's; a branch's is scaled by sqrt(k)
  checkpoint_losses: tuple[float, ...] = (2.1, 2.0, 1.9)  # true loss of the reference there
  ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  replicates: int = 4
  delta_tokens: int = 2**22
  replicate_noise: float = 0.02  # s.d. of a replicate's loss offset, shared by its k (its data)
  loss_noise: float = 0.001  # s.d. of each branch's own final eval loss
  rows_per_branch: int = 20  # logged train rows per branch; the last step is also evaluated


REFERENCE = "reference"  # the reference run's dir, beside the branch sweep dir
BRANCHES = "branches"


def checkpoint_steps(scan: Scan, branching: Branching) -> list[int]:
  """The reference's steps at its checkpoint losses (its time scale is 1: no seed scatter)."""
  batch = branching.batch_sequences * scan.seq_len
  return [int(round(float(scan.truth.steps(loss, batch, branching.size))))
          for loss in branching.checkpoint_losses]


def branch_curve(truth: Truth, size: ModelSize, from_loss: float, batch_tokens: float,
                 steps: np.ndarray) -> np.ndarray:
  """Noise-free loss `steps` steps into a branch at `batch_tokens` from a state at `from_loss`."""
  start = float(truth.steps(from_loss, batch_tokens, size))  # where that batch's curve is at L0
  return truth.loss_at(start + np.asarray(steps, float), batch_tokens, size)


def branch_excess(scan: Scan, branching: Branching, from_loss: float) -> np.ndarray:
  """Noise-free final loss of each k's branch minus that of k = 1 (nats), per branching.ks."""
  batch = branching.batch_sequences * scan.seq_len
  final = [branch_curve(scan.truth, branching.size, from_loss, k * batch,
                        [branching.delta_tokens / (k * batch)])[0] for k in branching.ks]
  return np.asarray(final) - final[0]


def true_local_cbs(scan: Scan, branching: Branching, from_loss: float, epsilon: float) -> float:
  """The largest k*B (tokens) whose noise-free branch ends within `epsilon` of k = 1's."""
  within = np.flatnonzero(branch_excess(scan, branching, from_loss) <= epsilon)
  return float(branching.ks[within[-1]] * branching.batch_sequences * scan.seq_len)


def write_branches(root: epath.PathLike, scan: Scan = Scan(), branching: Branching = Branching(),
                   seed: int = 0) -> epath.Path:
  """Writes ROOT/reference (an ordinary run) and ROOT/branches (a sweep of branch runs from it).

  The reference trains as scan's runs do, with no seed scatter of its time scale, so its true
  loss at each checkpoint step is a checkpoint loss. Branch (checkpoint, k, replicate) trains
  Δ tokens at k times its batch; its final eval loss is the noise-free branch's plus the
  replicate's offset (shared by every k) and its own noise. Returns the branch sweep dir.
  """
  root = epath.Path(root)
  rng = np.random.default_rng(seed)
  size, b_ref = branching.size, branching.batch_sequences
  ref_scan = dataclasses.replace(scan, run_noise=0.0)
  curves = simulate_curves(ref_scan, size, b_ref * scan.seq_len, 1.0, rng)
  last = int(curves[Col.STEP][-1])
  write_run(root / REFERENCE, run_plan(scan, size, b_ref, branching.learning_rate, 0),
            run_config(scan, size, b_ref, 0), metric_rows(curves),
            wd.Status(wd.DONE, "reached target loss", last, last * b_ref * scan.seq_len))
  points = []
  for at, from_loss in zip(checkpoint_steps(scan, branching), branching.checkpoint_losses):
    offsets = branching.replicate_noise * rng.standard_normal(branching.replicates)
    for k in branching.ks:
      batch = k * b_ref
      n = branching.delta_tokens // (batch * scan.seq_len)
      step = np.unique(np.linspace(1, n, branching.rows_per_branch).round().astype(np.int64))
      clean = branch_curve(scan.truth, size, from_loss, batch * scan.seq_len, step)
      for r, offset in enumerate(offsets):
        sd = scan.loss_noise * np.sqrt(8192.0 / (batch * scan.seq_len))
        final = clean[-1] + offset + branching.loss_noise * rng.standard_normal()
        rows = metric_rows({
            Col.STEP: step.astype(float), Col.TOKENS: step * batch * scan.seq_len,
            Col.TRAIN_LOSS: clean + offset + sd * rng.standard_normal(len(step)),
            Col.B_SIMPLE_TOKENS: np.full(len(step), np.nan),
            load.EVAL_STEP: step[-1:].astype(float), Col.EVAL_LOSS: np.array([final])})
        point = {"at": at, "k": k, "replicate": r}
        plan = dataclasses.replace(
            run_plan(scan, size, batch, branching.learning_rate * np.sqrt(k), 0),
            arg=f"at={at},k={k},replicate={r}", max_steps=int(n),
            max_tokens=int(n * batch * scan.seq_len), target_loss=None)
        config = {**run_config(scan, size, batch, 0), "branch": {
            "from_workdir": f"../{REFERENCE}", "from_step": at, "replicate": r}}
        write_run(root / BRANCHES / sweep_lib.point_relpath(point), plan, config, rows,
                  wd.Status(wd.DONE, "trained its tokens", int(n), int(n) * batch * scan.seq_len))
        points.append(point)
  sweep_lib.write_sweep_json("synthetic_branches", sweep_lib.Sweep(points=points),
                             str(root / BRANCHES))
  return root / BRANCHES
