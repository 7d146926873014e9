"""A damaged latest checkpoint (any part) falls back to the previous one, set aside and named."""

import json
import pathlib

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from bscan import checkpoint as checkpoint_lib


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_two(workdir) -> None:
  """Checkpoints at steps 1 and 2 of a small state, an iterator and loop counters."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=2)
  it = _iterator()
  for step in (1, 2):
    next(it)
    ckpt.save(step, {"w": jnp.full((4, 4), float(step))}, it, {"count": step})
  ckpt.close()


def _truncate_array_files(state: pathlib.Path) -> None:
  """Empties the OCDBT data files (where the array bytes live)."""
  files = [f for d in state.rglob("d") if d.is_dir() for f in d.iterdir()]
  assert files
  for f in files:
    f.write_bytes(b"")


DAMAGE = {
    "arrays": lambda c: _truncate_array_files(c / "state"),
    "array metadata": lambda c: (c / "state" / "_METADATA").write_text("{not json"),
    "iterator state": lambda c: (c / "data" / "metadata").write_text("{"),
    "iterator state of the wrong shape": lambda c: (c / "data" / "metadata").write_text(
        json.dumps({"unknown": 1})),
    "loop counters": lambda c: (c / "loop" / "metadata").write_text("[1, 2"),
    "loop counters of the wrong shape": lambda c: (c / "loop" / "metadata").write_text(
        json.dumps({"unknown": 1})),
}


@pytest.mark.parametrize("part", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous(tmp_path, part, capsys):
  _save_two(tmp_path)
  DAMAGE[part](tmp_path / "checkpoints" / "2")
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=2)
  it = _iterator()
  abstract = {"w": jnp.zeros((4, 4))}
  step, state, loop = ckpt.restore(abstract, it, lambda d: d["count"])
  assert (step, loop) == (1, 1)
  np.testing.assert_array_equal(state["w"], np.full((4, 4), 1.0))
  assert next(it) == 1  # the iterator resumes after the one element step 1 consumed
  out = capsys.readouterr().out
  assert f"checkpoint at step 2 in {tmp_path / 'checkpoints'} is damaged" in out
  assert "falling back to the previous checkpoint" in out
  assert (tmp_path / "checkpoints" / "damaged" / "2").is_dir()  # kept for a post-mortem
  assert ckpt.latest_step() == 1
  ckpt.save(2, {"w": jnp.ones((4, 4))}, it, {"count": 2})  # the step can be saved again
  ckpt.close()


def test_nothing_intact_starts_over(tmp_path):
  _save_two(tmp_path)
  for step in ("1", "2"):
    DAMAGE["loop counters"](tmp_path / "checkpoints" / step)
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=2)
  assert ckpt.restore({"w": jnp.zeros((4, 4))}, _iterator(), lambda d: d["count"]) is None
  assert ckpt.latest_step() is None
  ckpt.close()
