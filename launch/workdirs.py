"""What launchers read from point workdirs (local or gs://): access check and status.json."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

FINAL_STATES = ("done", "diverged")  # a point in one of these never runs again


class WorkdirError(RuntimeError):
  """The sweep dir cannot be used: missing extra, no credentials, no permission."""


def check_access(sweep_dir: str) -> None:
  """Fails early, with a clear message, when sweep_dir (local or gs://) is not usable."""
  path = epath.Path(sweep_dir)
  is_gcs = str(sweep_dir).startswith("gs://")
  try:
    if path.exists() and not path.is_dir():
      raise WorkdirError(f"sweep dir {sweep_dir} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
  except WorkdirError:
    raise
  except ImportError as e:
    raise WorkdirError(f"cannot access {sweep_dir}: {e}. gs:// workdirs need gcsfs: "
                       "pip install 'bscan[gcs]' (or pip install gcsfs)") from e
  except Exception as e:  # auth errors come from google-auth/gcsfs with many types
    hint = ("; log in with `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS, and check the bucket exists and you may write it"
            if is_gcs else "")
    raise WorkdirError(f"cannot access {sweep_dir}: {type(e).__name__}: {e}{hint}") from e


def read_status(workdir: str) -> dict[str, Any] | None:
  """The point's status.json, or None when it has not started (or the file is torn)."""
  try:
    return json.loads((epath.Path(workdir) / "status.json").read_text())
  except (FileNotFoundError, ValueError):
    return None


def state(status: dict[str, Any] | None) -> str:
  """The status string ('running', 'done', ...), '' when the point has not started."""
  return str(status.get("status", "")) if status else ""


def is_final(status: dict[str, Any] | None) -> bool:
  """Whether a point is finished for good (done or diverged)."""
  return state(status) in FINAL_STATES


def describe(status: dict[str, Any] | None) -> str:
  """One-line summary of a status, e.g. 'done (step 1200, reached target 3.1)'."""
  if not status:
    return "not started"
  text = f"{status.get('status')} (step {status.get('step')}"
  reason = status.get("reason")
  return text + (f", {reason})" if reason else ")")
