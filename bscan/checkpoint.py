"""Orbax checkpoints of the train state, the data iterator (all processes' state merged into
one JSON) and the loop's own counters."""

from collections.abc import Callable
import json
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from bscan import data as data_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError

DAMAGED = "damaged"  # damaged checkpoints are moved here (under checkpoints/), never deleted
PROCESSES_KEY = "processes"  # a data state per process (grain worker processes)


class Checkpointer:
  """One CheckpointManager: keep-N policy, state + data iterator + loop state saved together."""

  def __init__(self, workdir: epath.PathLike, keep: int, read_only: bool = False):
    """`read_only`: another run's checkpoints (a branch's reference), never changed."""
    self._directory = workdir_lib.checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self._directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), create=not read_only, read_only=read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, loop: dict[str, Any],
           force: bool = False) -> None:
    """Saves on every process (a collective: all call it at the same step)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(gather_data_state(data_iter)),
        loop=ocp.args.JsonSave(loop)), force=force)

  def restore(self, abstract_state: Any, data_iter: Any,
              parse_loop: Callable[[dict[str, Any]], Any]) -> tuple[int, Any, Any] | None:
    """Restores the newest intact checkpoint into `data_iter`: (step, state, parsed loop).

    A damaged checkpoint (arrays, metadata, iterator state or loop counters) is moved aside
    to checkpoints/damaged/ with a warning naming it, and the previous one is tried; None
    when there is none left (the run starts over).
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore()))
        restore_data_state(data_iter, out.data)
        loop = parse_loop(dict(out.loop))
      except ConfigError:  # intact, but not for this job (say, another process count)
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught  (any part may be torn)
        self._set_aside(step, e)
        continue
      return step, out.state, loop
    return None

  def restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """The state saved at `step`, its iterator state set on `data_iter` (another run's
    checkpoint: nothing is set aside); ConfigError when there is none."""
    steps = sorted(self._manager.all_steps())
    if step not in steps:
      raise ConfigError(f"{self._directory} has no checkpoint at step {step}; it has "
                        f"{steps or 'none'} (keep the steps you branch from: checkpoint.keep)")
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      restore_data_state(data_iter, out.data)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise ConfigError(f"the checkpoint at step {step} in {self._directory} cannot be "
                        f"restored here ({type(e).__name__}: {e})") from e
    return out.state

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves a damaged checkpoint out of the manager's sight (process 0), with a warning."""
    src = self._directory / str(step)
    dst = self._directory / DAMAGED / str(step)
    message = (f"checkpoint at step {step} in {self._directory} is damaged "
               f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
               f"; moved to {dst}, falling back to the previous checkpoint")
    logging.warning(message)
    if jax.process_index() == 0:
      print(f"warning: {message}", flush=True)
      dst.parent.mkdir(parents=True, exist_ok=True)
      if dst.exists():
        dst.rmtree()
      src.rename(dst)
    if jax.process_count() > 1:  # every process must see it gone before reloading
      multihost_utils.sync_global_devices(f"bscan_set_aside_{step}")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _allgather_json(value: Any) -> list[Any]:
  """Every process's JSON value, in process order (a collective)."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array(len(data)))).reshape(-1)
  padded = np.zeros([int(lengths.max())], np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(gathered[i, :n]).decode()) for i, n in enumerate(lengths)]


def gather_data_state(data_iter: Any) -> dict[str, Any]:
  """The data iterator state of all processes as one JSON value.

  bscan.data's states are keyed by shard: merged, any process count resumes from them.
  With grain worker processes (data.worker_count > 0) the state is per process instead.
  """
  state = data_iter.get_state()
  states = [state] if jax.process_count() == 1 else _allgather_json(state)
  if all(data_lib.SHARDS_KEY in s for s in states):
    return {data_lib.SHARDS_KEY: {k: v for s in states for k, v in s[data_lib.SHARDS_KEY].items()}}
  return {PROCESSES_KEY: states}


def restore_data_state(data_iter: Any, state: dict[str, Any]) -> None:
  """Sets this process's part of a gather_data_state value on data_iter."""
  if PROCESSES_KEY not in state:
    data_iter.set_state(state)
    return
  states = state[PROCESSES_KEY]
  if len(states) != jax.process_count():
    raise ConfigError(
        f"the checkpoint's data state is per process (data.worker_count > 0) for "
        f"{len(states)} process(es), and this run has {jax.process_count()}: resume it on "
        f"{len(states)} process(es), or with data.worker_count=0 from the start")
  data_iter.set_state(states[jax.process_index()])


def abstract(state: Any) -> Any:
  """ShapeDtypeStructs with shardings: what StandardRestore needs to place arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
