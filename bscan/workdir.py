"""A run's files (JAX-free): names, statuses, the run plan record, metric columns, readers, writers.

Every module that touches `config.json`, `metrics.jsonl`, `status.json` or the checkpoint
directory goes through here: the trainer, the launchers, the analysis and the test fakes.

Local workdirs append metric rows to `metrics.jsonl`. Object stores (`gs://`: no append, no
atomic rename) get numbered chunk objects `metrics/00000000.jsonl`, ... instead, one per flush,
so writing costs the rows written; readers concatenate the file and then the chunks in order.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

from bscan.errors import ConfigError

PathLike = str | os.PathLike

CONFIG = "config.json"
METRICS = "metrics.jsonl"
METRICS_CHUNKS = "metrics"  # object stores: numbered chunk objects in this directory
STATUS = "status.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
SHARE_TOKEN = ".shared-check"  # multi-process runs: process 0 writes it, the others read it

# Statuses. A run that is `running`, `failed` or `preempted` resumes from its checkpoint when
# its command runs again; `done` and `diverged` are final (a new workdir trains again).
RUNNING, DONE, DIVERGED, FAILED, PREEMPTED = "running", "done", "diverged", "failed", "preempted"
STATUSES = (RUNNING, DONE, DIVERGED, FAILED, PREEMPTED)
FINAL_STATES = (DONE, DIVERGED)
RESUMABLE_STATES = (RUNNING, FAILED, PREEMPTED)


class Col:
  """Metric column names of metrics.jsonl (one row per logged step)."""

  STEP = "step"
  TOKENS = "tokens"  # trained up to and including this step
  BATCH = "batch_size"  # this step's global batch (sequences): a ramp changes it
  # Tokens a branched ramp controller trained in branches it did not keep, up to this step.
  OVERHEAD_TOKENS = "ramp_overhead_tokens"
  TRAIN_LOSS = "train_loss"
  LR = "lr"
  GRAD_NORM = "grad_norm"
  STEP_TIME_S = "step_time_s"
  TOKENS_PER_S = "tokens_per_s"
  EVAL_LOSS = "eval_loss"  # on eval steps only
  G_SMALL_SQ = "ns_g_small_sq"  # E|G_small|²
  G_BIG_SQ = "ns_g_big_sq"  # |G_big|²
  GSQ = "ns_gsq"  # per-step |G|² estimate
  TRACE = "ns_trace"  # per-step tr Σ estimate
  B_SIMPLE_TOKENS = "b_simple_tokens"
  B_SIMPLE_SEQS = "b_simple_seqs"
  # Hessian-weighted B_noise, on its cadence (noise.hessian_every).
  Q_SMALL, Q_BIG, GHG, TRHS = "ns_q_small", "ns_q_big", "ns_ghg", "ns_trhs"
  B_NOISE_UNDEFINED = "ns_b_noise_undefined"
  B_NOISE_TOKENS = "b_noise_tokens"
  B_NOISE_SEQS = "b_noise_seqs"
  GROUP_PREFIX = "ns_group/"  # per-layer-group B_simple: ns_group/<group>/b_simple_tokens


WALL_CLOCK_COLUMNS = (Col.STEP_TIME_S, Col.TOKENS_PER_S)  # differ between identical runs


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a run is, computed once from its config: `derived` in config.json is its asdict."""

  arg: str
  size: str
  n_params: int  # non-embedding parameters N
  n_params_embedding: int
  n_layer: int
  d_model: int
  seq_len: int
  batch_sequences: int
  batch_tokens: int
  learning_rate: float  # peak
  seed: int
  num_devices: int
  per_device_sequences: int
  num_microbatches: int  # K per device
  microbatch_sequences: int
  microbatch_tokens: int
  warmup_steps: int
  max_steps: int  # the budget, or the cap of a run that stops on a target loss
  max_tokens: int
  target_loss: float | None  # None: a fixed budget
  vocab_size: int
  dataset: str
  tokenizer: str
  corpus_fingerprint: dict[str, Any] | None = None
  num_processes: int = 1  # JAX processes (hosts) the run was started on
  data_shards: int = 1  # gcd(batch_size, data.shards): see bscan.data
  backend: str = ""  # jax.default_backend(): cpu, gpu or tpu ('' before it was recorded)
  device_kind: str = ""  # e.g. 'TPU v4', 'NVIDIA H100 80GB HBM3', 'cpu'

  @classmethod
  def from_dict(cls, derived: Mapping[str, Any]) -> RunPlan:
    """The plan of a config.json `derived` (unknown keys ignored; missing ones raise)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in derived.items() if k in names})


def plan_fields() -> tuple[str, ...]:
  """The field names of a run plan (the keys of `derived`)."""
  return tuple(f.name for f in dataclasses.fields(RunPlan))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """config.json: the full config (as JSON), the config-file arg and the plan as a dict."""

  config: dict[str, Any]
  arg: str
  derived: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Status:
  """status.json."""

  status: str
  reason: str = ""
  step: int = 0
  tokens: int = 0
  updated: str = ""

  @property
  def final(self) -> bool:
    return self.status in FINAL_STATES

  def describe(self) -> str:
    """One line, e.g. 'done (step 1200, reached target loss 3.1)'."""
    return f"{self.status} (step {self.step}" + (f", {self.reason})" if self.reason else ")")


@dataclasses.dataclass(frozen=True)
class BadLine:
  """A metrics line that is not a JSON object with an integer step."""

  path: str
  line: int  # 1-based, within its file
  problem: str
  last: bool  # the file's last line: what a kill mid-write leaves

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.problem}"


def _path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir)


def is_remote(workdir: PathLike) -> bool:
  """Whether the workdir is on an object store (no append, no atomic rename)."""
  return "://" in os.fspath(workdir)


def checkpoint_dir(workdir: PathLike) -> epath.Path:
  """Where orbax keeps the run's checkpoints (absolute for local paths: orbax needs it)."""
  path = _path(workdir) / CHECKPOINTS
  return path if is_remote(workdir) else path.resolve()


SWEEP_MARKER = "sweep.json"  # a launcher writes it at the root of every sweep dir


def sweep_root(workdir: PathLike) -> epath.Path:
  """The sweep dir holding a run: its nearest parent with sweep.json (else its parent)."""
  run = _path(workdir)
  for parent in run.parents:
    if (parent / SWEEP_MARKER).exists():
      return parent
    if parent == parent.parent:
      break
  return run.parent


def branch_reference(workdir: PathLike, from_workdir: str) -> epath.Path:
  """A branch run's reference run dir: `from_workdir` absolute (or a URL), else relative to
  the sweep dir holding the branch (e.g. '../scan/b8' from runs/compare/branches)."""
  ref = epath.Path(from_workdir)
  return ref if ref.is_absolute() or "://" in from_workdir else sweep_root(workdir) / ref


def tensorboard_dir(workdir: PathLike) -> epath.Path:
  return _path(workdir) / TENSORBOARD


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Write-then-rename where the filesystem has rename; an object store's put is atomic."""
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def _read_json_object(path: epath.Path, fix: str) -> dict[str, Any] | None:
  """A JSON object file, None when absent; a ConfigError naming the file and `fix` otherwise."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except (IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); {fix}") from e
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
  return data


CONFIG_FIX = ("it records which config this workdir trains: if it belongs to this command, "
              "delete it and rerun (it is rewritten), otherwise use another --workdir")
STATUS_FIX = "delete it and rerun: the status is rebuilt from the checkpoint"


def check_usable(workdir: PathLike) -> None:
  """Raises ConfigError when `workdir` cannot hold a run (a file, unwritable, no gcsfs)."""
  path = _path(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise ConfigError(f"--workdir={workdir} is a file, not a directory; use another path")
    path.mkdir(parents=True, exist_ok=True)
    if not is_remote(workdir) and not os.access(path, os.W_OK):
      raise ConfigError(f"--workdir={workdir} is not writable; fix its permissions or use "
                        "another path")
  except ConfigError:
    raise
  except ImportError as e:
    raise ConfigError(f"--workdir={workdir}: {e}; gs:// workdirs need gcsfs: "
                      "pip install 'bscan[gcs]'") from e
  except Exception as e:  # auth and permission errors come with many types
    raise ConfigError(f"--workdir={workdir} cannot be created ({type(e).__name__}: {e}); "
                      "check the path, its permissions or your credentials") from e


# --- config.json ---


def write_share_token(workdir: PathLike, token: str) -> None:
  """Process 0's token: every process of a run must read it back from its own workdir."""
  _path(workdir).mkdir(parents=True, exist_ok=True)
  write_text_atomic(_path(workdir) / SHARE_TOKEN, token)


def read_share_token(workdir: PathLike) -> str | None:
  """The token as this process sees it; None where it is not there (another directory)."""
  path = _path(workdir) / SHARE_TOKEN
  return path.read_text() if path.exists() else None


def remove_share_token(workdir: PathLike) -> None:
  (_path(workdir) / SHARE_TOKEN).unlink(missing_ok=True)


def write_config(workdir: PathLike, config: Mapping[str, Any], arg: str, plan: RunPlan) -> None:
  """Writes config.json: the full config, the config-file arg and the run plan."""
  record = {"config": dict(config), "arg": arg, "derived": dataclasses.asdict(plan)}
  write_text_atomic(_path(workdir) / CONFIG, json.dumps(record, indent=2))


def read_config(workdir: PathLike) -> RunConfig | None:
  """config.json, None when absent; ConfigError naming the file when it is damaged."""
  path = _path(workdir) / CONFIG
  data = _read_json_object(path, CONFIG_FIX)
  if data is None:
    return None
  if not isinstance(data.get("config"), dict):
    raise ConfigError(f"{path} has no 'config' object; {CONFIG_FIX}")
  derived = data.get("derived") if isinstance(data.get("derived"), dict) else {}
  return RunConfig(config=data["config"], arg=str(data.get("arg", "")), derived=derived)


# --- status.json ---


def write_status(workdir: PathLike, status: str, reason: str, step: int, tokens: int) -> None:
  """Writes status.json atomically (pollers never see half a file)."""
  if status not in STATUSES:
    raise ValueError(f"unknown status {status!r}; one of {STATUSES}")
  now = datetime.datetime.now(datetime.timezone.utc).isoformat()
  write_text_atomic(_path(workdir) / STATUS, json.dumps(dataclasses.asdict(
      Status(status=status, reason=reason, step=int(step), tokens=int(tokens), updated=now))))


def read_status(workdir: PathLike) -> Status | None:
  """status.json, None when the run never started; ConfigError naming the file when damaged."""
  path = _path(workdir) / STATUS
  data = _read_json_object(path, STATUS_FIX)
  if data is None:
    return None
  if data.get("status") not in STATUSES:
    raise ConfigError(f"{path}: status {data.get('status')!r} is not one of {STATUSES}; "
                      f"{STATUS_FIX}")
  try:
    return Status(status=data["status"], reason=str(data.get("reason") or ""),
                  step=int(data.get("step") or 0), tokens=int(data.get("tokens") or 0),
                  updated=str(data.get("updated") or ""))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path}: {e}; {STATUS_FIX}") from e


def read_status_or_damaged(workdir: PathLike) -> Status | None:
  """For launchers: a damaged status.json reads as a resumable 'failed' with the reason."""
  try:
    return read_status(workdir)
  except ConfigError as e:
    return Status(status=FAILED, reason=str(e))


def describe(status: Status | None) -> str:
  """One line for a status, 'not started' for None."""
  return status.describe() if status else "not started"


def is_final(status: Status | None) -> bool:
  return bool(status and status.final)


# --- metrics.jsonl (+ chunks on object stores) ---


def _clean(value: Any) -> Any:
  """JSON-safe scalars: NaN and inf become null (strict JSON has neither)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def encode_rows(rows: Iterable[Mapping[str, Any]]) -> str:
  """JSON lines, NaN/inf as null."""
  return "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows)


def parse_rows(text: str, path: str) -> tuple[list[dict[str, Any]], list[BadLine]]:
  """Rows of JSON-lines text, and every line that is not an object with an integer step."""
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  rows, bad = [], []
  for i, line in enumerate(lines):
    last = i == len(lines) - 1
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      bad.append(BadLine(path, i + 1, f"not JSON ({e.msg})", last))
      continue
    if not isinstance(rec, dict):
      bad.append(BadLine(path, i + 1, f"a JSON {type(rec).__name__}, not an object", last))
    elif not isinstance(rec.get(Col.STEP), int) or isinstance(rec.get(Col.STEP), bool):
      bad.append(BadLine(path, i + 1, "no integer 'step'", last))
    else:
      rows.append(rec)
  return rows, bad


def _chunk_paths(workdir: PathLike) -> list[epath.Path]:
  directory = _path(workdir) / METRICS_CHUNKS
  if not directory.exists():
    return []
  return sorted((p for p in directory.iterdir() if p.name.endswith(".jsonl")),
                key=lambda p: p.name)


def _metric_files(workdir: PathLike) -> list[epath.Path]:
  """metrics.jsonl (if any), then the chunks in order."""
  single = _path(workdir) / METRICS
  return ([single] if single.exists() else []) + _chunk_paths(workdir)


def read_metrics(workdir: PathLike) -> tuple[list[dict[str, Any]], list[BadLine]]:
  """All metric rows in order, and the lines that could not be read (with line numbers)."""
  rows, bad = [], []
  for path in _metric_files(workdir):
    r, b = parse_rows(path.read_text(), os.fspath(path))
    rows += r
    bad += b
  return rows, bad


def torn_tail(bad: Sequence[BadLine]) -> bool:
  """Whether the only damage is one unreadable last line of the last file (a kill mid-write)."""
  return len(bad) == 1 and bad[0].last and bad[0].problem.startswith("not JSON")


class MetricsWriter:
  """Appends metric rows (process 0 only) and mirrors them to TensorBoard.

  Local files get each row at once. On object stores rows are buffered and each `flush()`
  (the loop flushes before every checkpoint) writes one new chunk object: O(rows written).
  """

  def __init__(self, workdir: PathLike, enabled: bool = True, remote_flush_rows: int = 200,
               tensorboard: bool = True):
    self._workdir = _path(workdir)
    self._remote = is_remote(workdir)
    self._enabled = enabled
    self._flush_rows = remote_flush_rows
    self._pending: list[Mapping[str, Any]] = []
    self._next_chunk = 0
    self._tb = None
    if enabled and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (process 0 only)
      self._tb = tensorboardX.SummaryWriter(os.fspath(tensorboard_dir(workdir)))

  def resume(self, step: int, expected_rows: int | None) -> int:
    """Keeps the rows of steps ≤ `step` (every step appears once); returns how many are kept.

    Raises ConfigError when a kept line is unreadable, or when fewer rows than the checkpoint
    recorded (`expected_rows`) survive: rows lost before the checkpoint are never dropped
    quietly.
    """
    if not self._enabled:
      return 0
    kept_total = 0
    files = _metric_files(self._workdir)
    for i, path in enumerate(files):
      rows, bad = parse_rows(path.read_text(), os.fspath(path))
      torn = [b for b in bad if b.last and i == len(files) - 1 and b.problem.startswith("not JSON")]
      bad = [b for b in bad if b not in torn]  # a torn last line is what a kill leaves
      if bad:
        raise ConfigError(
            f"{bad[0]} ({len(bad)} unreadable line(s) in all); repair or delete those lines "
            "and rerun to resume")
      kept = [r for r in rows if r[Col.STEP] <= step]
      kept_total += len(kept)
      if len(kept) == len(rows) and not torn:
        continue
      if kept:
        write_text_atomic(path, encode_rows(kept))  # a kill mid-write must not lose the file
      else:
        path.unlink()
    if expected_rows is not None and kept_total < expected_rows:
      raise ConfigError(
          f"{self._workdir / METRICS}: {expected_rows - kept_total} of the {expected_rows} "
          f"rows logged up to the checkpoint at step {step} are missing (the file was "
          "truncated or edited); restore it from a copy and rerun, or train again in a new "
          "--workdir")
    chunks = self._chunks()
    self._next_chunk = int(chunks[-1].name.split(".")[0]) + 1 if chunks else 0
    return kept_total

  def _chunks(self) -> list[epath.Path]:
    return _chunk_paths(self._workdir)

  def write(self, row: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    self._pending.append(row)
    if not self._remote or len(self._pending) >= self._flush_rows:
      self.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != Col.STEP and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, row[Col.STEP])

  def flush(self) -> None:
    """Writes the buffered rows: appended locally, one new chunk object on object stores."""
    if not self._pending:
      return
    text = encode_rows(self._pending)
    if self._remote:
      directory = self._workdir / METRICS_CHUNKS
      directory.mkdir(parents=True, exist_ok=True)
      (directory / f"{self._next_chunk:08d}.jsonl").write_text(text)
      self._next_chunk += 1
    else:
      with (self._workdir / METRICS).open("a") as f:
        f.write(text)
    self._pending.clear()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
