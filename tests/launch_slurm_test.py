"""Tests for launch.slurm: rendered sbatch golden, submitit debug executor, requeue hook."""

import json
import os
import subprocess
import sys

import pytest

import goldens
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from launch import slurm

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FIXTURE = os.path.join(TESTS, "sweep_fixture_config.py")
TINY_SCAN = os.path.join(TESTS, "tiny_scan_config.py")  # a real scan config: points validated
PARAMS = dict(job_name="bscan", partition="gpu", time=60, nodes=1, gpus_per_node=8,
              cpus_per_task=8, mem="64G", account="acc", qos="high", constraint="a100",
              exclude="", setup=["module load cuda"], max_parallel=4)


def _cli(*args: str, steps: int = 3, config: str = FIXTURE) -> subprocess.CompletedProcess:
  env = {**os.environ, "FAKE_TRAINER_STEPS": str(steps), "FAKE_TRAINER_STEP_S": "0.01"}
  return subprocess.run([sys.executable, "-m", "launch.slurm", f"--config={config}", *args],
                        cwd=REPO, env=env, text=True, capture_output=True, timeout=60,
                        stdin=subprocess.DEVNULL, check=False)  # debug executor: pdb reads EOF


def test_render_only_matches_golden(tmp_path):
  """--render_only prints each point's command and the array sbatch script, submits nothing;
  config overrides and environment reach every point, and GPU jobs require the GPU backend."""
  result = _cli(f"--workdir={tmp_path}/sweep", "--partition=gpu", "--time=600", "--nodes=2",
                "--gpus_per_node=1", "--cpus_per_task=32", "--mem=400G", "--account=acc",
                "--qos=high", "--setup=source ~/venv/bin/activate", "--python=python3",
                "--config_override=data.data_dir=/shared/tfds", "--env=TFDS_DATA_DIR=/shared",
                "--render_only", config=TINY_SCAN)
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "sweep").exists()
  text = result.stdout.replace(str(tmp_path), "<TMP>").replace(REPO, "<REPO>")
  goldens.check_golden("slurm_render.txt", text, "tests/launch_slurm_test.py")


def test_points_the_nodes_cannot_split_fail_before_submitting(tmp_path):
  """Batch 2 on 2 nodes × 8 GPUs: one error line naming the point and the device count."""
  result = _cli(f"--workdir={tmp_path}/sweep", "--nodes=2", "--gpus_per_node=8",
                "--executor=debug", config=TINY_SCAN)
  assert result.returncode == 2 and not (tmp_path / "sweep").exists()
  assert result.stderr.strip() == (
      "error: point size=tiny,batch=2 cannot run on 2 node(s) × 8 GPU(s) (16 device(s)): "
      "batch_size=2 is not divisible by the 16 devices; use a multiple of 16")


def test_debug_executor_runs_points_and_resubmits_only_unfinished(tmp_path):
  """Every point runs once through submitit; a failure is reported; a rerun skips done points."""
  flags = [f"--workdir={tmp_path}", "--executor=debug", f"--trainer={TESTS}/fake_trainer.py",
           "--wait"]
  result = _cli(*flags)
  assert result.returncode == 1, result.stderr
  assert result.stdout.count(": done (step 3") == 4
  assert "fail=1: failed: trainer exited with code 1; failed (step 1, RuntimeError" in result.stdout
  assert json.loads((tmp_path / "sweep.json").read_text())["targets"] == [3.0, 2.5]
  result = _cli(*flags)
  assert result.returncode == 1 and result.stdout.count(": job ") == 1, result.stdout


def test_train_point_gives_one_process_all_gpus_and_requeues(tmp_path):
  """The node process sees JAX_LOCAL_DEVICE_IDS for all GPUs; checkpoint() stops and requeues."""
  script = ("import os, sys; from bscan import workdir; "
            "workdir.write_status(sys.argv[1], 'done', os.environ['JAX_LOCAL_DEVICE_IDS'], 1, 8)")
  point = slurm.TrainPoint([sys.executable, "-c", script, str(tmp_path)], str(tmp_path), 4)
  assert point() == "done (step 1, 0,1,2,3)"
  sleeper = slurm.TrainPoint(["sleep", "30"], str(tmp_path / "other"), 0)
  sleeper._proc = subprocess.Popen(["sleep", "30"])  # as if __call__ were running it
  delayed = sleeper.checkpoint()
  assert sleeper._proc.returncode == -15 and delayed.function.argv == ["sleep", "30"]
  assert workdir_lib.read_status(str(tmp_path)).status == "done"


def test_bad_inputs_fail_clearly(tmp_path):
  """Bad memory sizes, gs:// sweeps without --slurm_dir and unknown configs are clear errors."""
  result = _cli(f"--workdir={tmp_path}", "--mem=lots", "--render_only")
  assert result.returncode == 2 and "--mem='lots' is not a SLURM memory size" in result.stderr
  result = _cli("--workdir=gs://bucket/sweep", "--render_only")
  assert result.returncode == 2 and "needs --slurm_dir" in result.stderr
  result = subprocess.run([sys.executable, "-m", "launch.slurm", "--config=nope.py",
                           f"--workdir={tmp_path}"], cwd=REPO, text=True, capture_output=True,
                          timeout=60, check=False)
  assert result.returncode == 2 and "nope.py' not found" in result.stderr


def test_newline_in_job_name_injects_no_sbatch_line(tmp_path):
  """A newline (or space, quote, '#') in a field of an #SBATCH line is refused, nothing printed."""
  result = _cli(f"--workdir={tmp_path}", "--job_name=bscan\n#SBATCH --qos=top", "--render_only")
  assert result.returncode == 2 and result.stdout == "", result.stdout
  assert result.stderr.startswith("error: --job_name='bscan\\n#SBATCH --qos=top': ")
  for flag in ("job_name", "partition", "account", "qos", "constraint", "exclude"):
    with pytest.raises(ConfigError, match=f"--{flag}="):
      slurm.slurm_parameters(**{**PARAMS, flag: "a b"})
  with pytest.raises(ConfigError, match="--setup="):
    slurm.slurm_parameters(**{**PARAMS, "setup": ["module load cuda\n#SBATCH --qos=top"]})
  script = slurm.render(slurm.slurm_parameters(**PARAMS), "/shared/slurm", "python3", 2)
  assert [l for l in script.splitlines() if "qos" in l] == ["#SBATCH --qos=high"]


def test_damaged_or_preempted_status_reruns_the_trainer(tmp_path):
  """A requeued job resumes a preempted point and one whose status.json is damaged."""
  script = ("import sys; from bscan import workdir; "
            "workdir.write_status(sys.argv[1], 'done', '', 2, 8)")
  for content in ('{"status": "preempted", "step": 1}', "{"):
    (tmp_path / workdir_lib.STATUS).write_text(content)
    assert slurm.TrainPoint([sys.executable, "-c", script, str(tmp_path)], str(tmp_path))() == (
        "done (step 2)")
