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
import json
import tempfile

import numpy as np
import pandas as pd
from etils import epath

from bscan.analysis import load


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
  return {"step": step, "tokens": step * batch_tokens, "train_loss": train,
          "eval_step": step[is_eval], "eval_loss": eval_loss, "b_simple_tokens": b_simple,
          "b_noise_tokens": np.full(len(step), np.nan)}


def run_config(scan: Scan, size: ModelSize, batch_sequences: int, lr: float, seed: int) -> dict:
  """config.json content of one synthetic run, in the trainer's format."""
  arg = f"size={size.name},batch={batch_sequences},lr={lr:g},seed={seed}"
  return {
      "config": {"seed": seed, "seq_len": scan.seq_len, "batch_size": batch_sequences,
                 "model": {"size": size.name}, "data": {"name": "synthetic"},
                 "tokenizer": {"name": "bytes"}},
      "arg": arg,
      "derived": {"size": size.name, "n_params": size.n_params, "n_layer": 2, "d_model": 128,
                  "seq_len": scan.seq_len, "batch_sequences": batch_sequences,
                  "batch_tokens": batch_sequences * scan.seq_len, "learning_rate": lr,
                  "seed": seed, "microbatch_sequences": 1, "num_devices": 1,
                  "num_microbatches": batch_sequences, "target_loss": min(scan.targets),
                  "max_tokens": scan.max_steps * batch_sequences * scan.seq_len,
                  "vocab_size": 256, "dataset": "synthetic", "tokenizer": "bytes"}}


def _points(scan: Scan):
  for size in scan.sizes:
    for b in scan.batch_sequences:
      for lr, slowdown in scan.learning_rates:
        for seed in scan.seeds:
          yield size, b, lr, slowdown, seed


def simulate_runs(scan: Scan = Scan(), seed: int = 0) -> pd.DataFrame:
  """The runs table of a synthetic sweep, built in memory (no files)."""
  rng = np.random.default_rng(seed)
  rows = []
  for size, b, lr, slowdown, run_seed in _points(scan):
    curves = simulate_curves(scan, size, b * scan.seq_len, slowdown, rng)
    status = {"status": "done", "reason": "reached target", "step": int(curves["step"][-1])}
    rows.append(load.run_row(run_config(scan, size, b, lr, run_seed), curves, status,
                             workdir=f"{size.name}_b{b}_lr{lr:g}_s{run_seed}"))
  return load.runs_table(rows)


def _records(curves: dict[str, np.ndarray]) -> list[dict]:
  """Per-step JSON records as the trainer writes them (NaN as null)."""
  evals = dict(zip(curves["eval_step"].tolist(), curves["eval_loss"].tolist()))
  out = []
  for i, s in enumerate(curves["step"].tolist()):
    b_simple = curves["b_simple_tokens"][i]
    rec = {"step": int(s), "tokens": int(curves["tokens"][i]),
           "train_loss": float(curves["train_loss"][i]), "lr": 1e-3, "grad_norm": 1.0,
           "b_simple_tokens": None if np.isnan(b_simple) else float(b_simple)}
    if s in evals:
      rec["eval_loss"] = evals[s]
    out.append(rec)
  return out


def _write_run(workdir: epath.Path, config: dict, records: list[dict], status: dict | None,
               truncate_last: bool = False) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config, indent=1))
  lines = [json.dumps(r) for r in records]
  text = "\n".join(lines) + ("\n" if lines else "")
  if truncate_last and lines:  # a run killed while writing its last line
    text = "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]
  if records or truncate_last:
    (workdir / "metrics.jsonl").write_text(text)
  if status is not None:
    (workdir / "status.json").write_text(json.dumps(status))


def write_sweep(root: epath.PathLike, scan: Scan = Scan(), seed: int = 0,
                messy: bool = True) -> epath.Path:
  """Writes a synthetic sweep: one workdir per run plus ROOT/sweep.json with the targets.

  With `messy`, the sweep also has what real sweeps have: a run killed mid-write (truncated last
  line, status 'running'), a run without status.json, a diverged run at a too-high learning
  rate, and a run that failed before logging anything.
  """
  root = epath.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i, (size, b, lr, slowdown, run_seed) in enumerate(_points(scan)):
    curves = simulate_curves(scan, size, b * scan.seq_len, slowdown, rng)
    last = int(curves["step"][-1])
    status = {"status": "done", "reason": "reached target loss", "step": last,
              "tokens": last * b * scan.seq_len, "updated": "2025-01-01T00:00:00"}
    truncated = messy and i == 1
    if truncated:
      status = dict(status, status="running", reason="")
    if messy and i == 2:
      status = None
    _write_run(root / f"{size.name}_b{b}_lr{lr:g}_s{run_seed}",
               run_config(scan, size, b, lr, run_seed), _records(curves), status,
               truncate_last=truncated)
  if messy:
    size, b = scan.sizes[-1], scan.batch_sequences[-1]
    lr = 10 * max(lr for lr, _ in scan.learning_rates)
    curves = simulate_curves(scan, size, b * scan.seq_len, 1.3, rng)
    cut = len(curves["step"]) // 3
    records = _records({k: v if k.startswith("eval") else v[:cut] for k, v in curves.items()})
    records = [r for r in records if r["step"] <= curves["step"][cut - 1]]
    for r in records[-5:]:  # loss blows up, then NaN (written as null)
      r["train_loss"] *= 3.0
    records.append({"step": records[-1]["step"] + 1, "train_loss": None})
    _write_run(root / f"{size.name}_b{b}_lr{lr:g}_s0", run_config(scan, size, b, lr, 0), records,
               {"status": "diverged", "reason": "non-finite loss", "step": records[-1]["step"]})
    _write_run(root / f"{size.name}_b{b}_lr{lr:g}_s1", run_config(scan, size, b, lr, 1), [],
               {"status": "failed", "reason": "preempted before the first step", "step": 0})
  (root / "sweep.json").write_text(json.dumps({"targets": list(scan.targets)}))
  return root


DEMO_SCAN = Scan(sizes=DEFAULT_SIZES[1:], batch_sequences=(8, 16, 32, 64, 128, 256, 512))


def write_demo_sweep(root: epath.PathLike | None = None) -> str:
  """Writes a small messy synthetic sweep (two model sizes) and returns its path."""
  root = root or tempfile.mkdtemp(prefix="bscan_demo_sweep_")
  return str(write_sweep(root, DEMO_SCAN, seed=0, messy=True))
