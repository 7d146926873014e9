"""Orbax checkpoints of the train state, the data iterator and the loop's own counters."""

from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """One CheckpointManager: keep-N policy, state + data iterator + loop state saved together."""

  def __init__(self, workdir: epath.PathLike, keep: int):
    directory = epath.Path(workdir) / "checkpoints"
    if "://" not in str(directory):
      directory = directory.resolve()  # orbax needs absolute local paths
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, loop: dict[str, Any],
           force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        loop=ocp.args.JsonSave(loop)), force=force)

  def restore(self, abstract_state: Any, data_iter: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the latest checkpoint in place into `data_iter`; returns (state, loop)."""
    step = self._manager.latest_step()
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        loop=ocp.args.JsonRestore()))
    return out.state, dict(out.loop)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(state: Any) -> Any:
  """ShapeDtypeStructs with shardings: what StandardRestore needs to place arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
