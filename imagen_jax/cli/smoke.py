"""A small multi-process check of everything multi-host training relies on.

  launch/multiprocess_cpu.sh 2 -- python -m imagen_jax.cli.smoke --workdir=/tmp/smoke
  launch/tpu_pod.sh my-tpu us-central2-b -- python -m imagen_jax.cli.smoke \
      --workdir=gs://bucket/smoke

Every process: joins the cluster (`hosts.initialize`), builds the global mesh, turns its
own rows of a known global batch into one global array and checks the all-reduced sums,
checks that `hosts.process0_decides` gives every process process 0's decision, then saves
an orbax checkpoint (all processes writing their shards) and restores it with target
shardings. It prints `SMOKE_OK {json}` and exits 0 when every check passes.

`--steps=N` instead runs N tiny all-reduce steps, polling `hosts.preemption_requested`;
after a SIGTERM to any process, every process saves the same step, prints `PREEMPTED {json}`
and exits 0. `--fail_process=I` makes process I raise an exception after joining, to test
that the others do not hang.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax.cli import gin_utils
from imagen_jax.parallel import hosts

ROWS_PER_DEVICE = 2
FEATURES = 3


def global_batch(num_rows: int) -> np.ndarray:
  """The known global batch: row r is r * 10 + [0, 1, 2]."""
  return (np.arange(num_rows)[:, None] * 10 + np.arange(FEATURES)[None, :]).astype(np.float32)


def check_global_array(mesh) -> dict:
  """Each process contributes its rows; the all-reduced sums must match the whole batch."""
  n = ROWS_PER_DEVICE * jax.device_count()
  rows = hosts.process_rows(mesh, n)
  expected = global_batch(n)
  local = {"x": expected[rows], "index": np.arange(n, dtype=np.int32)[rows]}
  batch = hosts.host_local_to_global(local, mesh)
  assert batch["x"].shape == (n, FEATURES), batch["x"].shape
  total, per_column = jax.jit(lambda x: (jnp.sum(x), jnp.sum(x, axis=0)))(batch["x"])
  # Replicated outputs: every process can read them.
  np.testing.assert_allclose(np.asarray(total), expected.sum())
  np.testing.assert_allclose(np.asarray(per_column), expected.sum(0))
  index_sum = int(jax.jit(jnp.sum)(batch["index"]))
  assert index_sum == n * (n - 1) // 2, index_sum
  for shard in batch["x"].addressable_shards:  # each device holds its own rows
    np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
  return {"rows": [rows.start, rows.stop], "sum": float(total)}


def state_for(mesh, step: int) -> dict:
  """A sharded array and a replicated scalar, both known functions of `step`."""
  n = ROWS_PER_DEVICE * jax.device_count()
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
  w = jax.make_array_from_callback(
      (n, FEATURES), sharding, lambda idx: global_batch(n)[idx] + step)
  # Even a scalar must be a global (replicated) array: orbax refuses a host-local one
  # when there is more than one process.
  step_array = jax.device_put(np.int32(step), NamedSharding(mesh, PartitionSpec()))
  return {"w": w, "step": step_array}


def check_state(state: dict, step: int) -> None:
  n = ROWS_PER_DEVICE * jax.device_count()
  for shard in state["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), global_batch(n)[shard.index] + step)
  assert int(state["step"]) == step, int(state["step"])


def checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def check_checkpoint(mesh, workdir: str) -> dict:
  """All processes save their shards; the restore, given target shardings, matches."""
  import orbax.checkpoint as ocp
  step = 7
  with checkpoint_manager(workdir) as manager:
    manager.save(step, args=ocp.args.StandardSave(state_for(mesh, step)))
    manager.wait_until_finished()
  hosts.sync_global_devices("smoke_saved")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state_for(mesh, 0))
  with checkpoint_manager(workdir) as manager:
    assert manager.latest_step() == step, manager.latest_step()
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  check_state(restored, step)
  assert restored["w"].sharding == abstract["w"].sharding
  return {"checkpoint_step": step}


def run_steps(mesh, workdir: str, steps: int, step_seconds: float) -> dict:
  """Tiny all-reduce steps until preemption; then every process saves the same step."""
  import orbax.checkpoint as ocp
  n = ROWS_PER_DEVICE * jax.device_count()
  x = hosts.host_local_to_global(global_batch(n)[hosts.process_rows(mesh, n)], mesh)
  total = jax.jit(jnp.sum)
  print(f"LOOP_STARTED pid={os.getpid()}", flush=True)
  with hosts.sigterm_requests_preemption():
    for step in range(steps):
      float(total(x + step))  # a cross-process collective each step
      if hosts.preemption_requested(step):
        with checkpoint_manager(workdir) as manager:
          manager.save(step, args=ocp.args.StandardSave(state_for(mesh, step)), force=True)
          manager.wait_until_finished()
        return {"preempted_at": step}
      time.sleep(step_seconds)
  return {"preempted_at": None}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  hosts.add_distributed_flags(parser)
  parser.add_argument("--workdir", required=True, help="Shared directory for the checkpoint.")
  parser.add_argument("--mesh", default=None, help="Mesh shape, e.g. 'data:2,fsdp:2'.")
  parser.add_argument("--steps", type=int, default=0,
                      help="Run this many steps waiting for a preemption instead.")
  parser.add_argument("--step_seconds", type=float, default=0.1)
  parser.add_argument("--fail_process", type=int, default=None,
                      help="This process raises an exception right after joining.")
  args = parser.parse_args(argv)
  info = hosts.initialize(args)
  report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "method": info.method}
  print(f"JOINED {json.dumps(report)}", flush=True)
  if args.fail_process == jax.process_index():
    # Uncaught: hosts' exception hook exits at once (status 1), not at the shutdown barrier.
    raise RuntimeError(f"process {jax.process_index()} failing on purpose")
  mesh = hosts.global_mesh(args.mesh)
  if args.steps:
    report.update(run_steps(mesh, args.workdir, args.steps, args.step_seconds))
    print(f"PREEMPTED {json.dumps(report)}", flush=True)
    return 0 if report["preempted_at"] is not None else 1
  report.update(check_global_array(mesh))
  # Only process 0 says yes; every process must hear its yes.
  report["process0_decides"] = hosts.process0_decides(jax.process_index() == 0)
  report.update(check_checkpoint(mesh, args.workdir))
  print(f"SMOKE_OK {json.dumps(report)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(gin_utils.run(main))
