"""Synthetic batch-size scans with a known critical batch size, in the workdir format.

Ground truth (Kaplan §5.1): a model of size N reaches loss L after S_min(L) steps at infinite
batch, where L = L_inf(N) + A * S_min^(-a); B_crit(L) = B* * L^(-1/alpha_B) depends on L only;
E_min(L) = B_crit(L) * S_min(L); a run at batch B reaches L after S(B) = S_min + E_min/B steps.
Each run's curve is that model inverted, with run-to-run multiplicative noise on its time scale
(seeds), per-step loss noise, a slower learning rate when asked, and a noise-scale column
B_simple ~ B_crit(L) with log-normal scatter. Used by the tests, the notebook's demo mode and
to try the analysis without a sweep.
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
  return {Col.STEP: step, Col.TOKENS: step * batch_tokens, Col.TRAIN_LOSS: train,
          load.EVAL_STEP: step[is_eval], Col.EVAL_LOSS: eval_loss, Col.B_SIMPLE_TOKENS: b_simple,
          Col.B_NOISE_TOKENS: np.full(len(step), np.nan)}


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
