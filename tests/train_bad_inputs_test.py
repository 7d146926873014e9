"""Bad input to experiments.train: one `error: …` line naming the field and fix, exit 2, no traceback.

Each case is a row of the bad-input table in docs/bad_inputs.md.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = "--config=experiments/configs/demo.py"
BRANCH = "--config=experiments/configs/compare_branches.py"
RAMP = "--config=experiments/configs/ramp.py"

# (flags after `python -m experiments.train`, a phrase the error line must hold). WORKDIR is a
# fresh directory; DAMAGED and OTHER hold a damaged config.json and another run's config.
CASES = [
    ([f"{DEMO}:bach=16"], "demo.py: unknown arg key(s) ['bach']; allowed: ['batch'"),
    ([f"{DEMO}:batch=abc"], "arg batch=abc must be an integer"),
    ([f"{DEMO}:batch=16.5"], "arg batch=16.5 must be an integer"),
    ([f"{DEMO}:batch16"], "config arg item 'batch16' must look like key=value"),
    ([f"{DEMO}:size=3x"], "model.size='3x' is unknown; choose one of"),
    ([f"{DEMO}:lr=-1"], "optim.lr=-1.0 must be positive"),
    ([f"{DEMO}:batch=12,microbatch=5"], "batch_size=12 is not divisible by devices × "
                                        "microbatch_size = 1 × 5"),
    ([f"{DEMO}:seq_len=256"], "seq_len=256 is longer than the model's context "
                              "model.max_len=128; lower seq_len or raise model.max_len"),
    ([f"{DEMO}:target=2.0"], "budget.target_loss needs a cap: set budget.max_tokens"),
    ([f"{DEMO}:target=2.0,max_tokens=1000000", "--config.optim.schedule=cosine"],
     "the decay would be tied to the cap"),
    ([DEMO, "--config.optim.lrr=3"], "--config.optim.lrr: no such config field"),
    ([DEMO, "--config.optim.lr=abc"], "flag --config.optim.lr=abc: could not convert string "
                                      "to float: 'abc'"),
    ([DEMO, "--config.model.dtype=float16"], "model.dtype='float16'; choose one of"),
    ([DEMO, "--config.noise.ema_decay=1.0"], "noise.ema_decay=1.0 must be in [0, 1)"),
    (["--config=experiments/configs/nothere.py"], "--config=experiments/configs/nothere.py: the "
                                                  "config file cannot be loaded"),
    ([DEMO, "--config.data.name=tfds", "--config.data.tfds_name=lm1bx"],
     "data.tfds_name='lm1bx' is not a TFDS dataset this installation knows, nor one "
     "prepared in"),
    ([DEMO, "--config.data.name=tfds", "--config.data.tfds_name=lm1b",
      "--config.data.data_dir=EMPTY"], "data.tfds_name='lm1b' is not prepared in"),
    ([DEMO, "--config.data.name=text_files", "--config.data.glob=/nonexistent/*.txt"],
     "data.glob='/nonexistent/*.txt' matches 0 files"),
    ([DEMO, "--config.data.name=webtext"], "data.name='webtext' is unknown"),
    ([DEMO, "--config.tokenizer.name=sentencepiece", "--config.tokenizer.path=README.md"],
     "tokenizer.path='README.md' is not a SentencePiece model"),
    ([DEMO, "--config.tokenizer.name=sentencepiece", "--config.tokenizer.path=/no/sp.model"],
     "tokenizer.path='/no/sp.model' does not exist"),
    ([DEMO, "--config.tokenizer.name=tiktoken", "--config.tokenizer.encoding=gpt3"],
     "tokenizer.encoding='gpt3' is not a tiktoken encoding"),
    ([DEMO, "--workdir=README.md"], "--workdir=README.md is a file, not a directory"),
    ([DEMO, "--workdir=DAMAGED"], "config.json is not valid JSON"),
    ([DEMO, "--workdir=OTHER"], "holds a run with a different config"),
    ([DEMO, "--multihost=maybe"], "flag --multihost=maybe: value should be one of"),
    ([DEMO, "batch=16"], "unexpected arguments ['batch=16']"),
    ([DEMO, "--config.data.shards=0"], "data.shards=0 must be >= 1"),
    ([DEMO, "--multihost=on"], "--multihost=on: coordinator_address should be defined. JAX "
                               "found no cluster to join; pass --coordinator_address"),
    ([DEMO, "--multihost=on", "--coordinator_address=10.0.0.2"],
     "--coordinator_address='10.0.0.2': give HOST:PORT"),
    ([DEMO, "--multihost=on", "--num_processes=2", "--process_id=2"],
     "--process_id=2: must be in [0, --num_processes=2)"),
    ([DEMO, "--process_id=1"], "--multihost=off with --coordinator_address/--num_processes/"
                               "--process_id: drop those flags, or use --multihost=on"),
    ([DEMO, "--multihost=on", "--coordinator_address=127.0.0.1:1", "--num_processes=2",
      "--process_id=1", "--initialization_timeout=1"],
     "process 1 cannot reach the coordinator at 127.0.0.1:1 within 1 s"),
    ([DEMO, "--backend=gpu"], "--backend=gpu: JAX runs on cpu (cpu); install JAX for them"),
    ([DEMO, "--config.optim.batch_scaling=linear", "--config.optim.reference_batch=16"],
     "optim.batch_scaling='linear' does not fit optim.name='adamw' (its rule is 'sqrt')"),
    ([DEMO, "--config.optim.name=lion"], "optim.name='lion' is unknown; choose one of"),
    ([DEMO, "--config.task=cnn"], "task='cnn' is unknown; choose one of ['lm', 'nqm']"),
    (["--config=experiments/configs/nqm.py", "--config.nqm.dim=3"],
     "nqm.dim=3 must be an even number ≥ 2"),
    ([f"{BRANCH}:k=2"], "holds no run (config.json missing); train the reference run first"),
    ([f"{BRANCH}:k=2", "--config.budget.train_tokens=0"], "a branch trains a fixed Δ"),
    ([f"{RAMP}:mode=schedule", "--config.optim.name=sgd", "--config.optim.batch_scaling=sqrt",
      "--config.optim.declare_scaling=False"],
     "optim.batch_scaling='sqrt' does not fit optim.name='sgd' (its rule is 'linear')"),
    ([f"{RAMP}:mode=schedule", "--config.ramp.schedule=0:4,2X:8"],
     "batch schedule threshold '2X' is not a token count"),
    ([DEMO, "--config.batch_size=8", "--config.ramp.schedule=0:8,1M:16",
      "--config.optim.batch_scaling=auto"], "the token stream would change; set data.shards=8"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
  """Every case run once through the binary's own main, in forked children of one process."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  dirs = {"EMPTY": tmp / "empty", "DAMAGED": tmp / "damaged", "OTHER": tmp / "other"}
  for d in dirs.values():
    d.mkdir()
  (dirs["DAMAGED"] / "config.json").write_text('{"config": {"seed": 0')
  (dirs["OTHER"] / "config.json").write_text(json.dumps({"config": {"seed": 7}, "arg": ""}))
  runs = []
  for i, (argv, _) in enumerate(CASES):
    for key, path in dirs.items():
      argv = [a.replace(f"={key}", f"={path}") for a in argv]
    if not any(a.startswith("--workdir") for a in argv):
      argv = [*argv, f"--workdir={tmp / f'run{i}'}"]
    runs.append(["--multihost=off", *argv])
  (tmp / "cases.json").write_text(json.dumps(runs))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
  env.update(BSCAN_DATA_DIR=str(tmp / "data"), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(REPO / "tests/cli_fork.py"), "experiments.train",
                  str(tmp / "cases.json"), str(tmp / "out.json")],
                 cwd=REPO, env=env, check=True, timeout=600)
  assert not (tmp / "data").exists()  # nothing was built before any of the errors
  return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_error_line(index, outcomes):
  phrase, out = CASES[index][1], outcomes[index]
  lines = out["stderr"].strip().splitlines()
  assert out["rc"] == 2, out["stderr"][-2000:]
  assert "Traceback" not in out["stderr"] and len(lines) == 1, out["stderr"][-2000:]
  assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
