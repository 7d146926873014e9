"""Orbax checkpoints of the train state, the data iterator and the loop's own counters."""

from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from bscan import workdir as workdir_lib

DAMAGED = "damaged"  # damaged checkpoints are moved here (under checkpoints/), never deleted


class Checkpointer:
  """One CheckpointManager: keep-N policy, state + data iterator + loop state saved together."""

  def __init__(self, workdir: epath.PathLike, keep: int):
    self._directory = workdir_lib.checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, loop: dict[str, Any],
           force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
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
            data=grain.checkpoint.CheckpointRestore(data_iter),
            loop=ocp.args.JsonRestore()))
        loop = parse_loop(dict(out.loop))
      except Exception as e:  # pylint: disable=broad-exception-caught  (any part may be torn)
        self._set_aside(step, e)
        continue
      return step, out.state, loop
    return None

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


def abstract(state: Any) -> Any:
  """ShapeDtypeStructs with shardings: what StandardRestore needs to place arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
