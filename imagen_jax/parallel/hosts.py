"""Multi-process (multi-host) set-up: `jax.distributed`, the global mesh, per-host data.

Every host of a TPU pod or GPU cluster runs the same program. Each one calls
`initialize(args)` first, before any JAX computation, then builds the same `global_mesh`
over all devices of all hosts, loads its own slice of every global batch and turns it into
one global `jax.Array` with `host_local_to_global`.

  parser = argparse.ArgumentParser()
  hosts.add_distributed_flags(parser)         # --coordinator_address, --process_count, ...
  args = parser.parse_args()
  hosts.initialize(args)                      # explicit flags, a detected cluster, or 1 process
  mesh = hosts.global_mesh("data:-1")
  local = pipeline.host_batch(step)           # rows [p*b, (p+1)*b) of the global batch
  batch = hosts.host_local_to_global(local, mesh)

Initialisation (t5x's flag names):
- all of `--coordinator_address`, `--process_count`, `--process_index` given: exactly
  those (`launch/multiprocess_cpu.sh` passes them);
- none given: if a cluster environment is detected (Cloud TPU VM, Slurm `srun`, Open MPI,
  Kubernetes indexed jobs or `JAX_COORDINATOR_ADDRESS`), `jax.distributed.initialize()`
  finds the values itself; otherwise the program runs as one process, untouched;
- some but not all: `UserError`.
Failures: finite initialisation, heartbeat and shutdown timeouts are always passed, so a
dead peer ends the others after `--heartbeat_timeout` seconds (JAX aborts them) instead of
a hang, and an uncaught exception ends its process at once (`fail_fast_exit`) rather than
at JAX's exit barrier. The launch scripts stop the survivors sooner, with one clear line.

On CPU, the cross-process collectives are gloo over TCP, JAX's default
(`jax_cpu_collectives_implementation`); each process's simulated device count comes from
its own `XLA_FLAGS=--xla_force_host_platform_device_count=D`. Gloo waits only 30 s for a
peer, so processes must reach a collective close together (see `sync_global_devices` and
the note on the compilation cache in launch/multiprocess_cpu.sh). See docs/multihost.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib

# Passed explicitly so that they are visible, finite and settable. The first two are JAX's
# defaults. JAX's shutdown timeout (300 s) is how long a process that is exiting waits for
# the others at the exit barrier: a process that fails while its peers are still working
# would hang that long, so ours is shorter. Healthy processes reach the barrier within
# seconds of each other (the last checkpoint save ends with a barrier of its own).
DEFAULT_INITIALIZATION_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
DEFAULT_SHUTDOWN_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """How this process was set up. `method`: explicit, a cluster name, or single."""
  process_index: int
  process_count: int
  method: str
  coordinator_address: str | None = None


# --------------------------------------------------------------------------------------
# Flags and initialisation.


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Adds t5x's multi-process flags and JAX's distributed timeouts to a parser."""
  group = parser.add_argument_group(
      "multi-process", "Leave all three of the first flags unset to auto-detect a cluster "
      "(Cloud TPU, Slurm, Open MPI, Kubernetes) or run as one process.")
  group.add_argument("--coordinator_address", default=None,
                     help="HOST:PORT of process 0's coordinator service.")
  group.add_argument("--process_count", type=int, default=None,
                     help="Number of processes (hosts) in the job.")
  group.add_argument("--process_index", type=int, default=None,
                     help="This process's index, 0 ... process_count - 1.")
  group.add_argument("--initialization_timeout", type=int,
                     default=DEFAULT_INITIALIZATION_TIMEOUT_S,
                     help="Seconds to wait for every process to connect.")
  group.add_argument("--heartbeat_timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                     help="Seconds without a heartbeat after which a peer counts as dead and "
                     "JAX stops every process.")
  group.add_argument("--shutdown_timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                     help="Seconds a finished process waits for the others at exit.")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the cluster environment `jax.distributed.initialize()` can read, or None.

  The checks mirror JAX's own (jax/_src/clusters/): Slurm inside `srun`, Open MPI's
  `mpirun`, Kubernetes indexed jobs, an explicit `JAX_COORDINATOR_ADDRESS`, and a Cloud
  TPU VM (libtpu found TPU chips when jax was imported).
  """
  env = os.environ if environ is None else environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    return "jax_env"
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")
  if all(v in env for v in slurm_vars):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    return "kubernetes"
  if environ is None and _running_on_cloud_tpu_vm():
    return "cloud_tpu"
  return None


def _running_on_cloud_tpu_vm() -> bool:
  # Set by jax's import-time TPU set-up when libtpu finds chips; no public equivalent.
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # pragma: no cover
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _get(opts: Mapping[str, Any], name: str, default: Any = None) -> Any:
  value = opts.get(name)
  return default if value is None else value


def _check_explicit(address: str | None, count: int | None, index: int | None) -> None:
  given = {"--coordinator_address": address, "--process_count": count,
           "--process_index": index}
  missing = [k for k, v in given.items() if v is None]
  if missing and len(missing) < 3:
    have = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
    raise UserError(f"multi-process flags are incomplete: got {have} but not "
                    f"{', '.join(missing)}; give all three (e.g. --coordinator_address="
                    "10.0.0.1:1234 --process_count=2 --process_index=0) or none to "
                    "auto-detect the cluster")
  if missing:
    return
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise UserError(f"--coordinator_address={address!r} is not HOST:PORT; write it as "
                    "e.g. 10.0.0.1:1234 (process 0's address)")
  if count < 1:
    raise UserError(f"--process_count={count} must be at least 1")
  if not 0 <= index < count:
    raise UserError(f"--process_index={index} must be in 0 ... {count - 1} "
                    f"(--process_count={count})")


def initialize(args_or_kwargs: Any = None, **kwargs: Any) -> DistributedInfo:
  """Initialises `jax.distributed` if this is a multi-process job; idempotent.

  `args_or_kwargs`: an argparse Namespace from `add_distributed_flags`, a dict with the
  same keys, or None; keyword arguments override it. Must run before any JAX computation
  (JAX cannot join a cluster once its backend has started).
  """
  opts = dict(vars(args_or_kwargs)) if isinstance(args_or_kwargs, argparse.Namespace) \
      else dict(args_or_kwargs or {})
  opts.update(kwargs)
  address = _get(opts, "coordinator_address")
  count = _get(opts, "process_count")
  index = _get(opts, "process_index")
  try:  # dicts may carry strings (e.g. from the environment)
    count, index = (None if v is None else int(v) for v in (count, index))
  except ValueError:
    raise UserError(f"process_count={count!r} and process_index={index!r} must be "
                    "integers") from None
  _check_explicit(address, count, index)
  timeouts = dict(
      initialization_timeout=int(_get(opts, "initialization_timeout",
                                      DEFAULT_INITIALIZATION_TIMEOUT_S)),
      heartbeat_timeout_seconds=int(_get(opts, "heartbeat_timeout",
                                         DEFAULT_HEARTBEAT_TIMEOUT_S)),
      shutdown_timeout_seconds=int(_get(opts, "shutdown_timeout",
                                        DEFAULT_SHUTDOWN_TIMEOUT_S)))
  for name, value in timeouts.items():
    if value <= 0:
      raise UserError(f"{name}={value} must be a positive number of seconds")

  if jax.distributed.is_initialized():
    info = _current_info("already_initialized")
    if count is not None and (count, index) != (info.process_count, info.process_index):
      raise UserError(f"jax.distributed is already initialised as process "
                      f"{info.process_index} of {info.process_count}, not {index} of "
                      f"{count}; initialise once per program")
    return info

  if address is not None:
    method = "explicit"
    call = dict(coordinator_address=address, num_processes=count, process_id=index)
  else:
    method = detect_cluster()
    if method is None:
      return DistributedInfo(process_index=0, process_count=1, method="single")
    call = {}
  logging.info("jax.distributed.initialize(%s) [%s]", call, method)
  try:
    jax.distributed.initialize(**call, **timeouts)
  except RuntimeError as e:
    if "backend" in str(e).lower() or "already" in str(e).lower():
      raise RuntimeError("hosts.initialize must run before any JAX computation (JAX "
                         f"cannot join a cluster after its backend started): {e}") from e
    raise
  info = _current_info(method)
  if info.process_count > 1:
    _install_fail_fast_excepthook()
  logging.info("process %d of %d, %d local / %d global devices", info.process_index,
               info.process_count, jax.local_device_count(), jax.device_count())
  return info


def _install_fail_fast_excepthook() -> None:
  """An uncaught exception ends this process at once, after printing its traceback.

  A normal exit waits at JAX's shutdown barrier for every other process, but those are
  usually stuck in a collective with this one: all would sit there until the shutdown
  timeout. Exiting without that barrier lets a launcher (or JAX's heartbeat) stop the
  others now, with this process's message.
  """
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    previous(exc_type, exc, tb)
    fail_fast_exit(1)

  sys.excepthook = hook


def fail_fast_exit(code: int) -> None:
  """Exits now with `code`, skipping the shutdown barrier when several processes run.

  For CLIs that catch an error themselves (e.g. a UserError on one process only): call it
  with their non-zero exit status. Any async checkpoint this process was writing is
  abandoned; orbax ignores such uncommitted directories.
  """
  if code and jax.process_count() > 1:
    logging.error("process %d exits with status %d without waiting for the others",
                  jax.process_index(), code)
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    logging.shutdown()
    os._exit(code)


def _current_info(method: str) -> DistributedInfo:
  from jax._src import distributed  # the coordinator address has no public getter
  state = distributed.global_state
  return DistributedInfo(process_index=state.process_id, process_count=state.num_processes,
                         method=method, coordinator_address=state.coordinator_address)


# --------------------------------------------------------------------------------------
# Mesh and data.


def process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """Rows of each global batch that one process loads: global / process count."""
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1:
    raise UserError(f"global batch size {global_batch_size} must be positive")
  if global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                    f"process count {process_count}; use a multiple of {process_count}")
  return global_batch_size // process_count


def num_slices(devices=None) -> int:
  """Number of TPU slices (ICI-connected groups) among the devices; 1 off multi-slice."""
  devices = jax.devices() if devices is None else devices
  return len({getattr(d, "slice_index", 0) for d in devices})


def hybrid_device_array(sizes: tuple[int, ...], devices) -> np.ndarray:
  """Devices arranged for a multi-slice mesh: the slices split the first ('data') axis.

  Within a slice the fast ICI links carry every axis; between slices the slow data-centre
  network carries only the data-parallel gradient all-reduce, as MaxText does.
  """
  n = num_slices(devices)
  if sizes[0] % n:
    raise UserError(f"mesh data axis {sizes[0]} is not a multiple of the {n} slices; "
                    f"on multi-slice the slices split the data axis, so make it a "
                    f"multiple of {n}")
  ici = (sizes[0] // n, *sizes[1:])
  dcn = (n,) + (1,) * (len(sizes) - 1)
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def global_mesh(shape: Mapping[str, int] | str | None = None, devices=None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor') over every device of every process.

  `shape` as in `parallel.mesh.make_mesh` ("data:-1,tensor:2", a dict, or None = all
  devices on 'data'). On one slice this is `mesh.make_mesh` (`jax.make_mesh` with
  `AxisType.Auto`); on several TPU slices the devices come from
  `mesh_utils.create_hybrid_device_mesh`, the slices splitting the data axis.
  """
  devices = jax.devices() if devices is None else list(devices)
  if num_slices(devices) == 1:
    return mesh_lib.make_mesh(shape, devices=devices)
  sizes = mesh_lib.resolve_mesh_shape(shape, len(devices))
  return Mesh(hybrid_device_array(sizes, devices), mesh_lib.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(mesh_lib.MESH_AXES))


def _spec_for(batch_spec: Any, ndim: int) -> PartitionSpec:
  if batch_spec is None:
    return mesh_lib.batch_spec(ndim)
  if callable(batch_spec):
    return batch_spec(ndim)
  return batch_spec


def _batch_blocks(sharding: NamedSharding) -> tuple[int, list[int]]:
  """(number of blocks the batch axis is split into, the blocks this process holds)."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
  n = math.prod(sharding.mesh.shape[a] for a in axes)
  held = {index[0].start or 0 for index in
          sharding.addressable_devices_indices_map((n,)).values()}
  return n, sorted(held)


def process_rows(mesh: Mesh, global_batch_size: int, batch_spec: Any = None) -> slice:
  """The rows of a global batch that this process's devices hold, as one slice.

  With the default meshes this is rows [p*b, (p+1)*b), b = global / process count: what
  the data pipeline loads. Raises UserError when the mesh scatters a process's rows.
  """
  n, held = _batch_blocks(NamedSharding(mesh, _spec_for(batch_spec, 1)))
  if global_batch_size % n:
    raise UserError(f"global batch size {global_batch_size} does not split into the {n} "
                    f"batch shards of mesh {dict(mesh.shape)}; use a multiple of {n}")
  if held != list(range(held[0], held[0] + len(held))):
    raise UserError(f"process {jax.process_index()} holds the non-contiguous batch shards "
                    f"{held} of {n}; order the mesh so each process's devices are "
                    "neighbours on the batch axes")
  block = global_batch_size // n
  return slice(held[0] * block, (held[-1] + 1) * block)


def host_local_to_global(batch: Any, mesh: Mesh, batch_spec: Any = None) -> Any:
  """Turns each process's slice of a batch (a pytree of numpy arrays) into global arrays.

  Every leaf's leading axis is the batch, sharded by `batch_spec` (a PartitionSpec, a
  function ndim -> PartitionSpec, or None for `mesh.batch_spec`, i.e. over
  ('data', 'fsdp')). A process passes the rows its devices hold (`process_rows`): with
  the batch split over all devices, rows [p*b, (p+1)*b) of the global batch, b = global /
  process count. Uses `jax.make_array_from_process_local_data`.
  """
  def convert(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, _spec_for(batch_spec, x.ndim))
    n, held = _batch_blocks(sharding)
    if x.ndim == 0 or x.shape[0] % len(held):
      raise UserError(f"host batch leaf of shape {x.shape} does not split into the "
                      f"{len(held)} batch shards this process holds; give each process "
                      "global_batch / process_count rows")
    global_shape = (x.shape[0] // len(held) * n,) + x.shape[1:]
    process_rows(mesh, global_shape[0], batch_spec)  # contiguity check
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(convert, batch)


# --------------------------------------------------------------------------------------
# Barriers and preemption.


_barrier_count = 0


def sync_global_devices(name: str, timeout_s: float | None = None) -> None:
  """Blocks until every process reaches the barrier `name`; a no-op with one process.

  A barrier of JAX's coordination service, like orbax's, not a device collective: it
  waits up to `timeout_s` (default: the initialisation timeout, 300 s), so processes may
  arrive far apart (one still compiling, say); gloo's CPU collectives give up after 30 s.
  A timeout raises an error naming the barrier.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:  # several processes without jax.distributed (not expected)
    multihost_utils.sync_global_devices(name)
    return
  _barrier_count += 1  # every process calls the barriers in the same order
  timeout_s = DEFAULT_INITIALIZATION_TIMEOUT_S if timeout_s is None else timeout_s
  client.wait_at_barrier(f"imagen_jax:{name}:{_barrier_count}", int(timeout_s * 1000))


_sigterm = threading.Event()


def _on_sigterm(signum, frame):
  del frame
  if _sigterm.is_set():  # a second SIGTERM: stop now
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
  _sigterm.set()
  logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")


def _preemption_service_running() -> bool:
  from jax._src import distributed  # no public getter
  return distributed.global_state.preemption_sync_manager is not None


@contextlib.contextmanager
def sigterm_requests_preemption():
  """Within it, SIGTERM makes `preemption_requested` return True; the previous handler is
  back on exit. Single process only: with several, JAX's preemption service (started by
  `jax.distributed.initialize`) owns SIGTERM, and outside the main thread Python allows no
  handler; in both cases this does nothing."""
  if _preemption_service_running() or threading.current_thread() is not threading.main_thread():
    yield
    return
  _sigterm.clear()
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _sigterm.clear()


def process0_decides(flag: bool) -> bool:
  """Process 0's `flag`, on every process: for a decision all processes must take at the
  same step although each computes its own (stopping on a time limit, where clocks
  differ). A collective: every process must call it at the same point. One process:
  `flag` itself.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def preemption_requested(step: int) -> bool:
  """True when training should save a checkpoint at `step` and exit. Call every step.

  Multi-process: JAX's preemption service (started by `jax.distributed.initialize`) owns
  SIGTERM; when any host receives one, all hosts agree on the next safe step and this
  returns True on that same step everywhere (`multihost_utils.reached_preemption_sync_
  point`), so every host saves the same step. All hosts must call it at every step.
  Single process: True once SIGTERM arrived inside `sigterm_requests_preemption()` (a
  second SIGTERM kills).
  """
  if _preemption_service_running():
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  return _sigterm.is_set()
