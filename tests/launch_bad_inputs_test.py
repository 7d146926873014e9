"""Bad launcher inputs a user would plausibly type: each is one `error:` line, exit 2.

Each row is a README bad-input row: (launcher args, a phrase of its error line). Paths:
SWEEP is a fresh sweep dir; TMP holds the configs some rows need.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = "--config=tests/sweep_fixture_config.py"  # relative to REPO, as users type it
LOCAL = ["launch.local", FIXTURE, "--workdir=SWEEP"]
SLURM = ["launch.slurm", FIXTURE, "--workdir=SWEEP", "--render_only"]
# A real scan config: its points are validated as the trainer will, on the job's devices.
SCAN_SLURM = ["launch.slurm", "--config=experiments/configs/scan.py", "--workdir=SWEEP",
              "--render_only"]
TPU = ["launch.tpu", "up", FIXTURE, "--workdir=gs://bucket/scan", "--zone=us-central2-b",
       "--dry_run"]
PKG = "bscan @ git+https://github.com/ORG/bscan@abc123"

ROWS = [
    # launch.local
    ([*LOCAL[:1], "--config=experiments/configs/nope.py", "--workdir=SWEEP"],
     "config file 'experiments/configs/nope.py' not found"),
    ([*LOCAL[:1], "--config=TMP/demo.py", "--workdir=SWEEP"], "defines no sweep()"),
    ([*LOCAL[:1], f"{FIXTURE}:size=3m", "--workdir=SWEEP"], "without ':ARG'"),
    ([*LOCAL[:1], "--config=TMP/dup_sweep.py", "--workdir=SWEEP"],
     "sweep has duplicate config args"),
    ([*LOCAL[:1], "--config=TMP/syntax_error.py", "--workdir=SWEEP"],
     "failed to import: SyntaxError: invalid syntax"),
    ([*LOCAL, "--parallel=0"], "--parallel=0: give the number of points"),
    ([*LOCAL, "--parallel=two"], "flag --parallel=two: invalid literal"),
    ([*LOCAL, "--paralel=2"], "Unknown command line flag 'paralel'"),
    ([*LOCAL[:2]], "--workdir is required"),
    ([*LOCAL[:2], "--workdir=README.md"], "is a file, not a directory"),
    ([*LOCAL, "--trainer=my_trainer.py"], "--trainer=my_trainer.py: no such file"),
    ([*LOCAL, "--python=python4"], "'python4' is not an executable here"),
    ([*LOCAL, "parallel=2"], "unexpected arguments ['parallel=2']"),
    ([*LOCAL, "--lock_dir=gs://bucket/locks"], "must be a local or NFS path"),
    ([*LOCAL[:2], "--workdir=gs://bucket/scan"], "gs:// workdirs need gcsfs"),
    # launch.slurm --render_only
    ([*SLURM, "--job_name=bscan\n#SBATCH --qos=top"], "'\\n #' cannot go into an #SBATCH line"),
    ([*SLURM, "--job_name=my scan"], "' ' cannot go into an #SBATCH line"),
    ([*SLURM, "--constraint=a100&ib"], "'&' cannot go into an #SBATCH line"),
    ([*SLURM, "--mem=64GiB"], "is not a SLURM memory size"),
    ([*SLURM, "--time=1:00:00"], "flag --time=1:00:00: invalid literal"),
    ([*SLURM, "--nodes=0"], "--nodes=0: must be >= 1"),
    ([*SLURM, "--executor=cluster"], "value should be one of <slurm|local|debug>"),
    ([*SLURM, "--setup=module load cuda\nsource env.sh"], "newlines and control characters"),
    ([*SLURM[:2], "--workdir=/shared/my runs", "--render_only"], "pass --slurm_dir=PATH"),
    ([*SLURM[:2], "--workdir=gs://bucket/scan", "--render_only"], "needs --slurm_dir"),
    ([*SCAN_SLURM, "--nodes=2", "--gpus_per_node=8"], "point size=25k,batch=2 cannot run on 2 "
     "node(s) × 8 GPU(s) (16 device(s)): batch_size=2 is not divisible by the 16 devices"),
    ([*SCAN_SLURM, "--config_override=data.nope=1"], "the config has no field data.nope"),
    ([*SCAN_SLURM, "--config_override=optim.lr=fast"], "optim.lr=fast: optim.lr is a float"),
    # launch.tpu --dry_run
    ([*TPU, "--package=bscan @@ git+https://github.com/ORG/bscan"],
     "is neither a local path nor a pip requirement"),
    ([*TPU, "--package=dist/bscan-0.1.0.tar.gz"], "no such file or directory here"),
    ([*TPU, "--package=-e ."], "pip would read it as an option"),
    ([*TPU, f"--package={PKG}", "--remote_dir=run dir"], "use only letters, digits and ._/~-"),
    ([*TPU, f"--package={PKG}", "--remote_dir=$(reboot)"], "use only letters, digits and ._/~-"),
    ([*TPU[:4], "--zone=us-central2", "--dry_run"], "is not a zone like us-central2-b"),
    ([*TPU, "--accelerator_type=v4-6"], "is not a TPU type like v4-8"),
    ([*TPU[:3], "--workdir=runs/scan", "--zone=us-central2-b"],
     "use gs://BUCKET/PATH, or an absolute path that every worker mounts"),
    ([*TPU, "--config_override=data_dir"], "give FIELD=VALUE with a dotted config field"),
    ([*TPU, "--env=TFDS_DATA_DIR"], "give NAME=VALUE, e.g. TFDS_DATA_DIR="),
    ([*TPU[:2], "--config=tests/pod_scan_config.py", *TPU[3:], "--accelerator_type=v4-16",
      "--config_override=data.dat_dir=gs://bucket/tfds"], "the config has no field data.dat_dir"),
    ([*TPU[:2], "--config=experiments/configs/kaplan.py", *TPU[3:], "--accelerator_type=v4-32"],
     "point size=3m,batch=8,seed=0 cannot run on v4-32 (16 devices, 4 hosts): batch_size=8 is "
     "not divisible by the 16 devices"),
    ([TPU[0], "run", *TPU[2:], "--watch"], "--watch goes with `up` (got `run`)"),
    ([*TPU, "--watch", "--tpu_name=my-vm"], "--watch recreates slices"),
    ([*TPU, "--max_recreations=-1"], "--max_recreations=-1: must be >= 0"),
    ([TPU[0], *TPU[2:]], "give one action: create | run | up | status | delete"),
    ([*TPU, "--tpu_name=my_vm"], "--tpu_name='my_vm': use lowercase letters"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
  """Files some rows need; a path without '[' (it lands in #SBATCH lines)."""
  path = tmp_path_factory.mktemp("bad_inputs")
  (path / "demo.py").write_text("def get_config(arg=''):\n  return None\n")  # not a scan
  (path / "dup_sweep.py").write_text(
      "from bscan import sweep as s\n"
      "def sweep():\n  return s.Sweep(points=[{'size': '3m'}, {'size': '3m'}], targets=[3.0])\n")
  (path / "syntax_error.py").write_text("def sweep(:\n  pass\n")
  return str(path)


def run_row(args: list[str], tmp: str) -> subprocess.CompletedProcess:
  """Runs `python -m LAUNCHER ARGS` in the repo, SWEEP and TMP replaced."""
  argv = [a.replace("SWEEP", f"{tmp}/sweep").replace("TMP", tmp) for a in args]
  return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, text=True, capture_output=True,
                        timeout=60, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("args, phrase", ROWS, ids=[f"{i:02d}-{r[0][0]}" for i, r in
                                                    enumerate(ROWS)])
def test_bad_input_is_one_error_line(args: list[str], phrase: str, tmp: str):
  """Exit 2, exactly one stderr line `error: …` with the phrase, no traceback, nothing run."""
  if "gcsfs" in phrase and importlib.util.find_spec("gcsfs"):
    pytest.skip("gcsfs is installed: the row needs a machine without it")
  result = run_row(args, tmp)
  lines = result.stderr.splitlines()
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert phrase in lines[0] and "Traceback" not in result.stderr + result.stdout, lines[0]
  assert not os.path.exists(f"{tmp}/sweep/sweep.json")  # found before anything was written
