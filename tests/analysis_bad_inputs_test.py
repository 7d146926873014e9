"""Bad inputs to `python -m bscan.analysis`: each gets one `error: …` line, exit 2, no traceback.

Rows of the README's table of bad inputs (analysis part). Flag and path errors are answered
before pandas, scipy or matplotlib are imported, so most rows take well under a second.
"""

import dataclasses
import shutil
import subprocess
import sys

import pytest

from bscan import workdir as wd
from bscan.analysis import synthetic

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 64, 256),
                      targets=(2.0, 2.2), run_noise=0.0, loss_noise=0.003)

# (id, arguments with {sweep} {file} {empty} {mixed} {out} {branches} {orphans} {root}
# placeholders, start of the error)
BAD = [
    ("targets-not-numbers", ["--workdir={sweep}", "--out={out}", "--targets=abc"],
     "flag --targets=['abc']: must be a comma-separated list of positive losses"),
    ("targets-semicolons", ["--workdir={sweep}", "--out={out}", "--targets=2.4;2.2"],
     "flag --targets=['2.4;2.2']: must be a comma-separated list"),
    ("targets-negative", ["--workdir={sweep}", "--out={out}", "--targets=-2.0"],
     "flag --targets=['-2.0']: must be a comma-separated list of positive losses"),
    ("targets-unreachable", ["--workdir={sweep}", "--out={out}", "--targets=0.9,1.0"],
     "no target can be fitted: fewer than 3 batch sizes of any model size reach 0.9, 1.0 "),
    ("confidence-above-1", ["--workdir={sweep}", "--out={out}", "--confidence=2"],
     "flag --confidence=2.0: must be a level between 0 and 1"),
    ("confidence-percent", ["--workdir={sweep}", "--out={out}", "--confidence=95"],
     "flag --confidence=95.0: must be a level between 0 and 1"),
    ("loss-unknown", ["--workdir={sweep}", "--out={out}", "--loss=valid"],
     "flag --loss=valid: value should be one of <train|eval>"),
    ("kaplan-not-bool", ["--workdir={sweep}", "--out={out}", "--kaplan=yes"],
     "flag --kaplan=yes: "),
    ("flag-typo", ["--workdir={sweep}", "--out={out}", "--target=2.0"],
     "Unknown command line flag 'target'. Did you mean: targets ?"),
    ("workdir-missing", ["--out={out}"], "flag --workdir=None: Flag --workdir must have a value"),
    ("workdir-empty", ["--workdir=", "--out={out}"], "--workdir is empty"),
    ("workdir-does-not-exist", ["--workdir={sweep}/nope", "--out={out}"],
     "--workdir={sweep}/nope does not exist"),
    ("workdir-is-a-file", ["--workdir={file}", "--out={out}"],
     "--workdir={file} is a file, not a sweep directory"),
    ("workdir-empty-entry", ["--workdir={sweep},,{sweep}", "--out={out}"],
     "--workdir={sweep},,{sweep} has an empty entry"),
    ("workdir-without-runs", ["--workdir={empty}", "--out={out}"], "no runs found in {empty}"),
    ("sweep-dir-positional", ["--workdir={sweep}", "--out={out}", "{sweep}"],
     "unexpected argument '{sweep}'"),
    ("out-missing", ["--workdir={sweep}"], "flag --out=None: Flag --out must have a value"),
    ("out-is-a-file", ["--workdir={sweep}", "--out={file}"], "--out={file} is a file"),
    ("mixed-tokenizers-in-one-size", ["--workdir={mixed}", "--out={out}"],
     "size 3m (n_params 3200000) mixes runs with different tokenizer: bytes, gpt2"),
    ("epsilon-zero", ["--workdir={sweep}", "--out={out}", "--epsilon=0"],
     "flag --epsilon=0.0: must be a positive loss difference in nats/token, e.g. 0.01"),
    ("epsilon-negative", ["--workdir={sweep}", "--out={out}", "--epsilon=-0.01"],
     "flag --epsilon=-0.01: must be a positive loss difference in nats/token, e.g. 0.01"),
    ("branch-alpha-above-1", ["--workdir={sweep}", "--out={out}", "--branch_alpha=1.5"],
     "flag --branch_alpha=1.5: must be a level between 0 and 1 (exclusive), e.g. 0.1"),
    ("branch-alpha-zero", ["--workdir={sweep}", "--out={out}", "--branch_alpha=0"],
     "flag --branch_alpha=0.0: must be a level between 0 and 1 (exclusive), e.g. 0.1"),
    ("branch-without-reference", ["--workdir={sweep},{orphans}", "--out={out}"],
     "branch run {orphans}/at669/k1/replicate0: its reference {root}/orphans/reference "
     "(branch.from_workdir='../reference') holds no run (config.json missing); pass the sweep "
     "that holds the reference together with the branches, or remove the branch runs"),
    ("only-branch-runs", ["--workdir={branches}", "--out={out}"],
     "only branch runs found in {branches} (4, config.branch set), no scan run; pass the scan "
     "sweep too, e.g. --workdir=SCAN_DIR,BRANCH_DIR"),
]
BRANCHING = synthetic.Branching(checkpoint_losses=(2.3,), ks=(1, 2), replicates=2)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_inputs")
  sweep = synthetic.write_sweep(root / "sweep", SCAN, messy=False)
  mixed = synthetic.write_sweep(root / "mixed", SCAN, messy=False)
  run = mixed / "3m/b64/lr1e-3/s0"  # one run of the size trained with another tokenizer
  config = wd.read_config(run)
  plan = dataclasses.replace(wd.RunPlan.from_dict(config.derived), tokenizer="gpt2")
  wd.write_config(run, config.config, config.arg, plan)
  (root / "empty").mkdir()
  branches = synthetic.write_branches(root / "cmp", SCAN, BRANCHING)
  orphans = synthetic.write_branches(root / "orphans", SCAN, BRANCHING)
  shutil.rmtree(root / "orphans" / synthetic.REFERENCE)  # the reference run is gone
  return {"sweep": sweep, "file": sweep / "sweep.json", "empty": root / "empty",
          "mixed": mixed, "out": root / "out", "branches": branches, "orphans": orphans,
          "root": root}


@pytest.mark.parametrize("args,error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_one_error_line(paths, args, error):
  proc = subprocess.run([sys.executable, "-m", "bscan.analysis",
                         *(a.format(**paths) for a in args)],
                        capture_output=True, text=True, timeout=120)
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith("error: " + error.format(**paths)), errors[0]
  assert proc.stderr.rstrip().endswith(errors[0])  # the last word, after any warnings
  assert proc.returncode == 2
  assert not paths["out"].exists()  # nothing written for input that cannot work
