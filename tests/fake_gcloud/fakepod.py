"""A simulated Cloud TPU pod behind a fake `gcloud` (tests/fake_gcloud/gcloud), for launcher tests.

It implements what launch.tpu calls, with gcloud's verbs, states and error words:
  compute tpus queued-resources create NAME --node-id=NODE --accelerator-type=T ...
      -> WAITING_FOR_RESOURCES; ACTIVE after FAKE_GCLOUD_WAITS (default 1) describes.
         ALREADY_EXISTS (exit 1) when NAME exists.
  compute tpus queued-resources describe NAME [--format=value(state.state)]
  compute tpus queued-resources list [--filter=name~REGEX]
  compute tpus queued-resources delete NAME [--force --async --quiet]
      -> kills the slice's worker processes and forgets it; NOT_FOUND (exit 1) when missing.
  compute tpus tpu-vm ssh NODE --worker=all|I --command=CMD
      -> `bash -c CMD` on every worker at once, each a local process in its own home
         STATE/nodes/NODE/worker-I (HOME and cwd), with ~/bin/hostname printing NODE-wI.
  compute tpus tpu-vm scp SRC... NODE:DEST --worker=all [--recurse]
      -> copies into every worker's home (DEST relative to it).
A leading `alpha` is accepted; --zone/--project/--quiet are ignored.

The workers of a slice are one JAX job: each gets FAKE_TPU_WORKER_ID / FAKE_TPU_NUM_WORKERS /
FAKE_TPU_COORDINATOR (127.0.0.1:a port chosen when the slice is created) and worker_site/ on
PYTHONPATH, whose sitecustomize.py teaches JAX's cluster auto-detection to read them; and
JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=<devices per host> (and
FAKE_GCLOUD_XLA_FLAGS, e.g. cheaper compiles for tests). The
topology follows the accelerator type (v4-16: 8 devices on 2 hosts). A worker's environment
is the caller's minus anything that names a cluster or bscan (SLURM_*, TPU_*, JAX_*,
BSCAN_*, PYTHONPATH): data and settings reach workers only through the launcher.

Each worker home holds `python`, the image's interpreter: it runs FAKE_GCLOUD_PYTHON (the
caller's Python, with bscan installed) except for `-m pip install ...`, which it records in
STATE/pip.log and skips (a worker image with bscan preinstalled). With FAKE_GCLOUD_CPU_LOG
set, each run's user/system/wall seconds are appended there (to size tests).

Faults, from the test (functions below, or `gcloud fake-preempt NAME` / `fake-vanish NAME`):
  preempt(state, name): SIGKILL every process of the slice's workers (a spot preemption
      gives no grace) and set the queued resource SUSPENDING, then SUSPENDED at the next
      describe, as Cloud TPU does with a preempted spot slice (state="PREEMPTED" sets that);
  vanish(state, name): the queued resource disappears (deleted elsewhere), workers killed.
kill_all(state) kills every worker process of the pod (a test's cleanup).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

STATE_ENV = "FAKE_GCLOUD_STATE"
PYTHON_ENV = "FAKE_GCLOUD_PYTHON"
XLA_FLAGS_ENV = "FAKE_GCLOUD_XLA_FLAGS"  # optional: more XLA flags for every worker
CPU_LOG_ENV = "FAKE_GCLOUD_CPU_LOG"  # optional: a file that gets each worker Python's CPU time
WAITS_ENV = "FAKE_GCLOUD_WAITS"
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_SITE = os.path.join(HERE, "worker_site")
_DROP = ("SLURM_", "TPU_", "JAX_", "BSCAN_", "FAKE_TPU_", "PYTEST_", "OMPI_", "PMI_")
_ACCELERATOR_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")


class GcloudError(Exception):
  """Printed as gcloud prints errors; exit status 1."""


def topology(accelerator: str) -> tuple[int, int]:
  """(devices, hosts), as Cloud TPU lays slices out (v4-16: 8 chips on 2 hosts)."""
  m = _ACCELERATOR_RE.match(accelerator)
  if not m:
    raise GcloudError(f"INVALID_ARGUMENT: accelerator type {accelerator!r} is not supported")
  generation, n = m.group(1), int(m.group(2))
  if generation in ("v5litepod", "v6e"):
    return n, 1 if n <= 8 else n // 4
  return (n // 2 if generation in ("v4", "v5p") else n), max(1, n // 8)


# --- state: STATE/resources/NAME.json, worker homes in STATE/nodes/NODE/worker-I ---


class _Locked:
  """An exclusive lock on the pod's state (gcloud calls and test faults run concurrently)."""

  def __init__(self, state: str):
    self.path = os.path.join(state, ".lock")

  def __enter__(self):
    self.f = open(self.path, "a")
    fcntl.flock(self.f, fcntl.LOCK_EX)

  def __exit__(self, *exc):
    fcntl.flock(self.f, fcntl.LOCK_UN)
    self.f.close()


def _resource_path(state: str, name: str) -> str:
  return os.path.join(state, "resources", f"{name}.json")


def _load(state: str, name: str) -> dict | None:
  try:
    with open(_resource_path(state, name)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _save(state: str, resource: dict) -> None:
  os.makedirs(os.path.join(state, "resources"), exist_ok=True)
  path = _resource_path(state, resource["name"])
  with open(path + ".tmp", "w") as f:
    json.dump(resource, f)
  os.replace(path + ".tmp", path)


def resources(state: str) -> list[dict]:
  """Every queued resource of the pod."""
  directory = os.path.join(state, "resources")
  names = sorted(n[:-5] for n in os.listdir(directory) if n.endswith(".json")) if (
      os.path.isdir(directory)) else []
  return [r for r in (_load(state, n) for n in names) if r]


def _not_found(verb: str, name: str) -> GcloudError:
  return GcloudError(f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: Resource "
                     f"'projects/fake/locations/fake-zone/queuedResources/{name}' was not found")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_home(state: str, node: str, worker: int) -> str:
  return os.path.join(state, "nodes", node, f"worker-{worker}")


def _provision(state: str, r: dict) -> None:
  """A fresh TPU VM per worker: an empty home with the image's hostname and python."""
  shutil.rmtree(os.path.join(state, "nodes", r["node"]), ignore_errors=True)
  python = os.environ.get(PYTHON_ENV) or sys.executable
  for i in range(r["hosts"]):
    home = worker_home(state, r["node"], i)
    os.makedirs(os.path.join(home, "bin"))
    _script(os.path.join(home, "bin", "hostname"), f"#!/bin/sh\necho {r['node']}-w{i}\n")
    _script(os.path.join(home, "python"), (
        "#!/bin/bash\n"
        'if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then\n'
        f'  echo "$(hostname) $*" >> {_q(os.path.join(state, "pip.log"))}; exit 0\n'
        "fi\n"
        'if [ -n "$FAKE_GCLOUD_CPU_LOG" ]; then  # CPU seconds of each run, to size tests\n'
        f'  exec /usr/bin/time -a -o "$FAKE_GCLOUD_CPU_LOG" -f "%U %S %e $*" {_q(python)} "$@"\n'
        "fi\n"
        f'exec {_q(python)} "$@"\n'))


def _q(text: str) -> str:
  return "'" + text.replace("'", "'\"'\"'") + "'"


def _script(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


def _worker_env(state: str, r: dict, worker: int) -> dict[str, str]:
  home = worker_home(state, r["node"], worker)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(_DROP) and k not in ("PYTHONPATH", STATE_ENV, "XLA_FLAGS")}
  env.update(HOME=home, PWD=home, PATH=f"{home}/bin:{env.get('PATH', '/usr/bin:/bin')}",
             PYTHONPATH=WORKER_SITE, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={r['devices'] // r['hosts']} "
                        + os.environ.get(XLA_FLAGS_ENV, "")).strip(),
             FAKE_TPU_WORKER_ID=str(worker), FAKE_TPU_NUM_WORKERS=str(r["hosts"]),
             FAKE_TPU_COORDINATOR=f"127.0.0.1:{r['port']}", FAKE_TPU_POD=state,
             FAKE_TPU_VM=r["vm"])
  return env


def _processes(marker: str) -> list[int]:
  """Pids of this user's processes whose environment holds `marker` (NAME=VALUE)."""
  needle, found = marker.encode(), []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if needle in f.read().split(b"\0"):
          found.append(int(pid))
    except OSError:
      continue
  return [p for p in found if p != os.getpid()]


def _kill(marker: str) -> int:
  """SIGKILLs every process carrying marker until none is left; how many were killed."""
  killed = set()
  for _ in range(50):
    pids = _processes(marker)
    if not pids:
      break
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
      except ProcessLookupError:
        pass
    time.sleep(0.05)
  return len(killed)


def kill_all(state: str) -> int:
  """Kills every worker process of the pod at `state` (tests' cleanup)."""
  return _kill(f"FAKE_TPU_POD={state}")


def preempt(state: str, name: str, new_state: str = "SUSPENDING") -> int:
  """A spot preemption: the slice's processes die at once; returns how many were killed."""
  with _Locked(state):
    r = _load(state, name)
    if r is None:
      raise _not_found("describe", name)
    killed = _kill(f"FAKE_TPU_VM={r['vm']}")
    r["state"] = new_state
    _save(state, r)
  return killed


def vanish(state: str, name: str) -> None:
  """The queued resource is deleted behind the launcher's back."""
  with _Locked(state):
    r = _load(state, name)
    if r is not None:
      _kill(f"FAKE_TPU_VM={r['vm']}")
      os.remove(_resource_path(state, name))


def _log(state: str, argv: list[str]) -> None:
  with open(os.path.join(state, "calls.log"), "a") as f:
    f.write(json.dumps(argv) + "\n")


# --- gcloud verbs ---


def _options(args: list[str]) -> tuple[list[str], dict[str, str]]:
  positional, options = [], {}
  for a in args:
    if a.startswith("--"):
      key, _, value = a[2:].partition("=")
      options[key] = value
    else:
      positional.append(a)
  return positional, options


def create(state: str, name: str, options: dict[str, str]) -> None:
  with _Locked(state):
    if _load(state, name) is not None:
      raise GcloudError(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: "
                        f"Resource 'projects/fake/locations/fake-zone/queuedResources/{name}' "
                        "already exists")
    devices, hosts = topology(options.get("accelerator-type", ""))
    _save(state, dict(name=name, node=options.get("node-id") or name, state="WAITING_FOR_RESOURCES",
                      describes=0, devices=devices, hosts=hosts, port=_free_port(),
                      vm=f"{name}@{uuid.uuid4().hex[:8]}", spot="spot" in options,
                      accelerator=options["accelerator-type"]))
  print(f"Create request issued for: [{name}]", file=sys.stderr)


def describe(state: str, name: str, options: dict[str, str]) -> None:
  with _Locked(state):
    r = _load(state, name)
    if r is None:
      raise _not_found("describe", name)
    r["describes"] += 1
    if r["state"] == "WAITING_FOR_RESOURCES" and r["describes"] > int(
        os.environ.get(WAITS_ENV, "1")):
      r["state"] = "ACTIVE"
      _provision(state, r)
    elif r["state"] == "SUSPENDING":
      r["state"] = "SUSPENDED"
    _save(state, r)
  if options.get("format") == "value(state.state)":
    print(r["state"])
  else:
    print(f"name: projects/fake/locations/fake-zone/queuedResources/{name}\n"
          f"state:\n  state: {r['state']}\ntpu:\n  nodeSpec:\n  - nodeId: {r['node']}\n"
          f"    node:\n      acceleratorType: {r['accelerator']}")


def list_(state: str, options: dict[str, str]) -> None:
  pattern = options.get("filter", "")
  regex = pattern.split("~", 1)[1] if pattern.startswith("name~") else ""
  print(f"{'NAME':<40} {'ZONE':<12} {'NODE_COUNT':<10} {'ACCELERATOR_TYPE':<16} STATE")
  for r in resources(state):
    if not regex or re.search(regex, r["name"]):
      print(f"{r['name']:<40} {'fake-zone':<12} {1:<10} {r['accelerator']:<16} {r['state']}")


def delete(state: str, name: str) -> None:
  with _Locked(state):
    r = _load(state, name)
    if r is None:
      raise _not_found("delete", name)
    _kill(f"FAKE_TPU_VM={r['vm']}")
    os.remove(_resource_path(state, name))
    shutil.rmtree(os.path.join(state, "nodes", r["node"]), ignore_errors=True)
  print(f"Delete request issued for: [{name}]", file=sys.stderr)


def _active_node(state: str, node: str, verb: str) -> dict:
  with _Locked(state):
    for r in resources(state):
      if r["node"] == node:
        if r["state"] != "ACTIVE":
          raise GcloudError(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) FAILED_PRECONDITION: "
                            f"TPU node {node} is not ready (queued resource {r['state']})")
        return r
  raise GcloudError(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: Resource "
                    f"'projects/fake/locations/fake-zone/nodes/{node}' was not found")


def _workers(r: dict, options: dict[str, str]) -> list[int]:
  which = options.get("worker", "0")
  return list(range(r["hosts"])) if which == "all" else [int(w) for w in which.split(",")]


def ssh(state: str, node: str, options: dict[str, str]) -> int:
  """Runs --command on the workers at once; prints their output in worker order."""
  r = _active_node(state, node, "ssh")
  command = options.get("command", "")
  procs = []
  for i in _workers(r, options):
    out = tempfile.TemporaryFile()
    home = worker_home(state, node, i)
    procs.append((i, out, subprocess.Popen(
        ["bash", "-c", command], cwd=home, env=_worker_env(state, r, i), stdin=subprocess.DEVNULL,
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)))
  rc = 0
  for i, out, proc in procs:
    code = proc.wait()
    out.seek(0)
    sys.stdout.write(out.read().decode(errors="replace"))
    if code:
      print(f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [{node}-w{i}] command exited with {code}",
            file=sys.stderr)
      rc = rc or code
  sys.stdout.flush()
  return rc


def scp(state: str, args: list[str], options: dict[str, str]) -> None:
  *sources, target = args
  node, _, dest = target.partition(":")
  r = _active_node(state, node, "scp")
  for i in _workers(r, options):
    home = worker_home(state, node, i)
    base = os.path.join(home, dest[2:] if dest.startswith("~/") else dest)
    for src in sources:
      into = base if dest.endswith("/") or os.path.isdir(base) else None
      to = os.path.join(into, os.path.basename(src.rstrip("/"))) if into else base
      if os.path.isdir(src):
        if "recurse" not in options:
          raise GcloudError(f"ERROR: (gcloud.compute.tpus.tpu-vm.scp) {src} is a directory; "
                            "use --recurse")
        shutil.copytree(src, to, dirs_exist_ok=True)
      else:
        shutil.copy(src, to)


def main(argv: list[str]) -> int:
  state = os.environ.get(STATE_ENV, "")
  if not state or not os.path.isdir(state):
    print(f"fake gcloud: set {STATE_ENV} to an existing directory", file=sys.stderr)
    return 2
  state = os.path.abspath(state)
  _log(state, argv)
  args = argv[1:] if argv[:1] == ["alpha"] else argv
  try:
    if args[:1] == ["fake-preempt"]:
      preempt(state, args[1], *args[2:3])
      return 0
    if args[:1] == ["fake-vanish"]:
      vanish(state, args[1])
      return 0
    if args[:2] != ["compute", "tpus"] or len(args) < 4:
      raise GcloudError(f"ERROR: (gcloud) fake gcloud does not implement {' '.join(argv)!r}")
    group, verb = args[2], args[3]
    positional, options = _options(args[4:])
    if group == "queued-resources" and verb == "create":
      create(state, positional[0], options)
    elif group == "queued-resources" and verb == "describe":
      describe(state, positional[0], options)
    elif group == "queued-resources" and verb == "list":
      list_(state, options)
    elif group == "queued-resources" and verb == "delete":
      delete(state, positional[0])
    elif group == "tpu-vm" and verb == "ssh":
      return ssh(state, positional[0], options)
    elif group == "tpu-vm" and verb == "scp":
      scp(state, positional, options)
    else:
      raise GcloudError(f"ERROR: (gcloud) fake gcloud does not implement {' '.join(argv)!r}")
  except GcloudError as e:
    print(e, file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
