"""NQM theory table: python -m experiments.nqm_table [--dim=128] [--conditions=10,1000] [--json=].

Per condition number of H and per target loss: the exact-scan B_crit (expected SGD loss curves
through the real steps-to-target protocol and S/E fit, bscan.nqm_theory.exact_scan) next to
McCandlish's B_noise and B_simple at that loss, and their ratios: how well B_crit ~ B_noise holds
for plain constant-lr SGD on a noisy quadratic.
"""

import json

from absl import app
from absl import flags
import numpy as np

from bscan import nqm_theory

_DIM = flags.DEFINE_integer("dim", 128, "Eigendirections of H.")
_NOISE = flags.DEFINE_float("noise", 0.0, "Sigma = noise * H; 0 = per condition, the noise "
                            "that puts the exact-scan B_crit at the middle target at --b_crit_mid.")
_B_CRIT_MID = flags.DEFINE_float("b_crit_mid", 16.0, "B_crit aimed at (--noise=0): mid-grid.")
_CONDITIONS = flags.DEFINE_list("conditions", ["10", "1000"], "Condition numbers of H.")
_BATCHES = flags.DEFINE_list("batches", [str(2 ** k) for k in range(9)], "Batch sizes.")
_N_LRS = flags.DEFINE_integer("n_lrs", 24, "Learning rates, log-spaced.")
_LR_RANGE = flags.DEFINE_float("lr_range", 1000.0, "Largest / smallest learning rate.")
_LR_MAX = flags.DEFINE_float("lr_max", 1.9, "Largest learning rate, times 1/h_max (< 2).")
_N_TARGETS = flags.DEFINE_integer("n_targets", 6, "Target losses per condition.")
_FIRST_STEP = flags.DEFINE_integer(
    "first_step", 20, "Highest target: the lowest loss gradient descent logs at this step.")
_SPAN = flags.DEFINE_float("span", 25.0, "Highest / lowest target loss.")
_TARGET_FRACS = flags.DEFINE_list(
    "target_fracs", [], "Targets as fractions of the initial loss, replacing the automatic ones "
    "(those above the loss GD logs at --first_step may be reached before the protocol's "
    "min_step = 10 at large batches, which drops those runs and biases S_min up).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 100_000, "Step cap of each run.")
_SEED = flags.DEFINE_integer("seed", 0, "Draws theta0.")
_JSON = flags.DEFINE_string("json", "", "Also write the tables here as JSON.")


def scan_condition(condition: float) -> dict:
  """The exact scan of one condition number, with the settings it was run at."""
  unit = nqm_theory.make_problem(_DIM.value, condition, 1.0, _SEED.value)
  lr_max = _LR_MAX.value / float(np.max(unit.h))
  lrs = np.geomspace(lr_max / _LR_RANGE.value, lr_max, _N_LRS.value)
  if _TARGET_FRACS.value:
    fracs = np.array([float(f) for f in _TARGET_FRACS.value])
    targets = nqm_theory.loss(unit, unit.theta0) * fracs
  else:
    targets = nqm_theory.choose_targets(unit, lrs, _N_TARGETS.value, _FIRST_STEP.value,
                                        _SPAN.value)
  batches = [int(b) for b in _BATCHES.value]
  mid = float(np.exp(np.mean(np.log(targets))))
  noise = _NOISE.value or nqm_theory.calibrate_noise(unit, batches, lrs, mid, _B_CRIT_MID.value,
                                                     _MAX_STEPS.value)
  p = nqm_theory.make_problem(_DIM.value, condition, noise, _SEED.value)
  table = nqm_theory.exact_scan(p, batches, lrs, targets, _MAX_STEPS.value)
  table.insert(1, "target_rel", table["target"] / nqm_theory.loss(p, p.theta0))
  table["crit_over_noise"] = table["b_crit"] / table["b_noise"]
  table["crit_over_simple"] = table["b_crit"] / table["b_simple"]
  # Best lr at the grid's low end: a lower lr might do better (the top end is the 2/h_max cap).
  table["lr_at_low_edge"] = table[[f"best_lr_{b}" for b in batches]].eq(lrs.min()).any(axis=1)
  return {"condition": condition, "noise": noise, "loss0": nqm_theory.loss(p, p.theta0),
          "lrs": lrs.tolist(), "batches": batches, "table": table}


def summary(table) -> str:
  """What the table says about McCandlish's B_crit ~ B_noise, in two lines."""
  fitted = table[np.isfinite(table["b_crit"])]
  if fitted.empty:
    return "  no target reached by 3 batch sizes: nothing fitted"
  ratio, simple = fitted["crit_over_noise"], fitted["crit_over_simple"]
  spread = float(np.exp(np.max(np.abs(np.log(ratio)))))
  return (f"  B_crit/B_noise {ratio.min():.3g}..{ratio.max():.3g} over {len(fitted)} targets "
          f"(high loss -> low: {ratio.iloc[0]:.3g} -> {ratio.iloc[-1]:.3g}): B_crit ~ B_noise "
          f"within a factor {spread:.2f}; B_crit/B_simple {simple.min():.3g}..{simple.max():.3g}."
          f"\n  S_min >= {fitted['s_min'].min():.3g} steps (the protocol drops crossings before "
          f"step 10). B_noise at the largest batch's state instead: "
          f"{fitted['b_noise_large'].min():.3g}..{fitted['b_noise_large'].max():.3g}.")


def main(argv):
  del argv
  results = [scan_condition(float(c)) for c in _CONDITIONS.value]
  shown = ["target_rel", "n_batches_reaching", "s_min", "b_crit", "b_noise", "b_simple",
           "crit_over_noise", "crit_over_simple", "b_noise_large", "fit_sigma",
           "lr_at_low_edge"]
  for res in results:
    print(f"\ncondition {res['condition']:g}: dim {_DIM.value}, noise {res['noise']:.4g} "
          f"(Sigma = noise * H), L0 {res['loss0']:.4g}, {len(res['lrs'])} lrs "
          f"{min(res['lrs']):.3g}..{max(res['lrs']):.3g}, batches {res['batches']}")
    print(res["table"][shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(summary(res["table"]))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      # NaN -> null: strict JSON readers reject NaN.
      json.dump([{**res, "table": [{k: (None if isinstance(v, float) and not np.isfinite(v)
                                        else v) for k, v in row.items()}
                                   for row in res["table"].to_dict(orient="records")]}
                 for res in results], f, indent=1)


if __name__ == "__main__":
  app.run(main)
