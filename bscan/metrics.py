"""Run outputs the analysis reads: metrics.jsonl, status.json, config.json, TensorBoard events."""

import datetime
import json
import math
from typing import Any, Mapping

from etils import epath

STATUSES = ("running", "done", "diverged", "failed")
WALL_CLOCK_KEYS = ("step_time_s", "tokens_per_s")  # differ between identical runs


def _clean(value: Any) -> Any:
  """JSON-safe scalars: NaN and inf become null (strict JSON has neither)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_rows(path: epath.Path) -> list[dict[str, Any]]:
  """Reads metrics.jsonl, dropping a truncated last line (a run killed mid-write)."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


REMOTE_FLUSH_ROWS = 200  # object stores cannot append: rows are rewritten in batches there


class MetricsWriter:
  """Writes one JSON line per logged step (process 0 only) and mirrors to TensorBoard.

  Local files get each row at once; on gs:// (no append) rows are buffered and the file is
  rewritten at `flush()`, which the loop calls before every checkpoint.
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool = True):
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._remote = "://" in str(workdir)
    self._enabled = enabled
    self._pending: list[str] = []
    self._tb = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (process 0 only)
      self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tb"))

  def truncate_after(self, step: int) -> None:
    """On resume: keep rows up to the restored step so every step appears exactly once."""
    if not self._enabled or not self._path.exists():
      return
    kept = [r for r in read_rows(self._path) if r["step"] <= step]
    tmp = self._path.parent / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(self._path)  # a kill mid-write must not lose the file

  def write(self, row: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    row = {k: _clean(v) for k, v in row.items()}
    self._pending.append(json.dumps(row) + "\n")
    if not self._remote or len(self._pending) >= REMOTE_FLUSH_ROWS:
      self.flush()
    for key, value in row.items():
      if key not in ("step",) and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, row["step"])

  def flush(self) -> None:
    """Writes the buffered rows."""
    if not self._pending:
      return
    if self._remote:
      old = self._path.read_text() if self._path.exists() else ""
      self._path.write_text(old + "".join(self._pending))
    else:
      with self._path.open("a") as f:
        f.write("".join(self._pending))
    self._pending.clear()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()


def write_status(workdir: epath.PathLike, status: str, reason: str, step: int,
                 tokens: int) -> None:
  """Writes status.json atomically enough for readers polling it (write then rename)."""
  assert status in STATUSES, status
  path = epath.Path(workdir) / "status.json"
  tmp = path.parent / "status.json.tmp"
  tmp.write_text(json.dumps({
      "status": status, "reason": reason, "step": step, "tokens": tokens,
      "updated": datetime.datetime.now(datetime.timezone.utc).isoformat()}))
  tmp.replace(path)


def read_status(workdir: epath.PathLike) -> dict[str, Any] | None:
  """status.json as a dict, or None when the run never started."""
  path = epath.Path(workdir) / "status.json"
  return json.loads(path.read_text()) if path.exists() else None
