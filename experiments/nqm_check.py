"""The pipeline against the closed form: python -m experiments.nqm_check --workdir=runs/nqm.

Reads a noisy-quadratic scan that the real sweep, launcher and trainer wrote (`make nqm`),
runs the real analysis on it, and compares each target's fitted B_crit with the exact scan
B_crit of the same problem, learning-rate grid, batch sizes, targets and protocol
(bscan.nqm_theory.exact_scan on the expected SGD loss curves). A target matches when the
exact value lies in the fitted interval or within 20% of the fit. Exit 0 when ≥ 4 targets
match, 1 otherwise (2: bad input).
"""

import json
import sys
import warnings

from absl import app
from absl import flags
import pandas as pd

from bscan import analysis
from bscan import nqm_theory
from bscan import sweep as sweep_lib
from bscan.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "The NQM sweep dir.", required=True)
_CONFIG = flags.DEFINE_string("config", "experiments/configs/nqm.py",
                              "The config file the sweep ran (its problem, grid and targets).")
_JSON = flags.DEFINE_string("json", "", "Also write the comparison here as JSON.")
_LOSS = flags.DEFINE_enum("loss", "train", ["train", "eval"], "The curve steps-to-target are "
                          "read from: the per-step batch loss (train, as in any scan) or the "
                          "held-out rows, here the exact loss ½θᵀHθ at log-spaced steps (eval).")
TOLERANCE = 0.2  # relative, when the exact value is outside the fitted interval
NEEDED = 4  # matching targets for success


def compare(workdir: str, config_path: str, loss: str = "train") -> pd.DataFrame:
  """Per target: the pipeline's fitted B_crit and interval beside the exact scan's."""
  module = sweep_lib.import_config(config_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fitted = analysis.analyze(workdir, loss=loss).critical
  p = module.problem()
  caps = [module.cap_tokens(b) // b for b in module.BATCHES]
  exact = nqm_theory.exact_scan(p, module.BATCHES, module.LRS, module.targets(), max(caps))
  table = exact[["target", "b_crit", "b_noise", "b_simple", "s_min", "e_min"]].rename(
      columns={"b_crit": "exact_b_crit", "s_min": "exact_s_min", "e_min": "exact_e_min",
               "b_noise": "exact_b_noise", "b_simple": "exact_b_simple"})
  fit = fitted[["target", "b_crit", "b_crit_lo", "b_crit_hi", "s_min", "e_min"]]
  table = table.merge(fit, on="target", how="left")
  inside = (table.exact_b_crit >= table.b_crit_lo) & (table.exact_b_crit <= table.b_crit_hi)
  close = (table.b_crit / table.exact_b_crit - 1).abs() <= TOLERANCE
  table["match"] = inside | close
  table["ratio"] = table.b_crit / table.exact_b_crit
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected argument {argv[1]!r}")
  try:
    table = compare(_WORKDIR.value, _CONFIG.value, _LOSS.value)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cols = ["target", "b_crit", "b_crit_lo", "b_crit_hi", "exact_b_crit", "ratio", "match",
          "exact_b_noise", "exact_b_simple", "s_min", "exact_s_min", "e_min", "exact_e_min"]
  with pd.option_context("display.width", 200, "display.precision", 4):
    print(table[cols].to_string(index=False))
  matched = int(table["match"].sum())
  print(f"{matched} of {len(table)} targets: the exact scan B_crit lies in the fitted interval "
        f"or within {TOLERANCE:.0%} of the fit (needed {NEEDED})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(json.loads(table.to_json(orient="records")), f, indent=1)
  sys.exit(0 if matched >= NEEDED else 1)


if __name__ == "__main__":
  app.run(main)
