"""On a simulated TPU worker: lets JAX's own cluster detection find the slice's job.

A Cloud TPU VM's workers find each other through the VM metadata server, which a local
process cannot reach. Here each worker's environment says who it is (FAKE_TPU_WORKER_ID,
FAKE_TPU_NUM_WORKERS, FAKE_TPU_COORDINATOR), and a ClusterEnv subclass reads it, so
`jax.distributed.initialize()` with no arguments joins the workers of one slice as one job,
as JAX's GCE TPU detection does on a real slice. The subclass is registered when JAX loads
`jax._src.clusters` (ClusterEnv subclasses register themselves when defined), so processes
that never import JAX (pip, the log copier) pay nothing.
"""

import importlib.abc
import importlib.util
import os
import sys

_MODULE = "jax._src.clusters"


def _register(clusters) -> None:
  """Defines the simulated slice's ClusterEnv and puts it first among JAX's detectors."""

  class FakeTpuCluster(clusters.ClusterEnv):
    name = "fake_tpu"

    @classmethod
    def is_env_present(cls) -> bool:
      return "FAKE_TPU_WORKER_ID" in os.environ

    @classmethod
    def get_coordinator_address(cls, timeout_secs=None, override_coordinator_port=None) -> str:
      host, port = os.environ["FAKE_TPU_COORDINATOR"].rsplit(":", 1)
      return f"{host}:{override_coordinator_port or port}"

    @classmethod
    def get_process_count(cls) -> int:
      return int(os.environ["FAKE_TPU_NUM_WORKERS"])

    @classmethod
    def get_process_id(cls) -> int:
      return int(os.environ["FAKE_TPU_WORKER_ID"])

    @classmethod
    def get_local_process_id(cls):
      return None  # every local device belongs to this worker, as on a TPU host

  types = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  types.remove(FakeTpuCluster)
  types.insert(0, FakeTpuCluster)


class _Hook(importlib.abc.MetaPathFinder):
  """Runs _register right after jax._src.clusters is executed."""

  def find_spec(self, fullname, path, target=None):
    if fullname != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      _register(module)

    spec.loader.exec_module = exec_and_register
    return spec


if "FAKE_TPU_WORKER_ID" in os.environ:
  sys.meta_path.insert(0, _Hook())
