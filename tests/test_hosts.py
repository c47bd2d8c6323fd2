"""hosts.py in one process: flags, cluster detection, batch split, meshes, global arrays,
preemption, and restoring a checkpoint onto a different mesh (8 simulated devices)."""

import argparse
import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from imagen_jax.errors import UserError
from imagen_jax.parallel import hosts
from imagen_jax.parallel import mesh as mesh_lib

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
                "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")


def parse(*argv):
  parser = argparse.ArgumentParser()
  hosts.add_distributed_flags(parser)
  return parser.parse_args(list(argv))


# ---------------------------------------------------------------- flags and initialize

def test_flags_have_t5x_names_and_finite_timeouts():
  args = parse("--coordinator_address=10.0.0.1:1234", "--process_count=4",
               "--process_index=3", "--heartbeat_timeout=7")
  assert (args.coordinator_address, args.process_count, args.process_index) == (
      "10.0.0.1:1234", 4, 3)
  assert args.heartbeat_timeout == 7
  assert 0 < args.initialization_timeout < 3600 and 0 < args.shutdown_timeout < 3600


@pytest.mark.parametrize("argv, message", [
    (["--process_count=2"], "--coordinator_address"),
    (["--coordinator_address=h:1", "--process_count=2"], "--process_index"),
    (["--process_index=0"], "--process_count"),
    (["--coordinator_address=nohostport", "--process_count=2", "--process_index=0"],
     "HOST:PORT"),
    (["--coordinator_address=h:1", "--process_count=2", "--process_index=2"],
     "--process_index=2"),
    (["--coordinator_address=h:1", "--process_count=0", "--process_index=0"],
     "--process_count=0"),
    (["--heartbeat_timeout=0"], "heartbeat_timeout"),
])
def test_bad_flags_raise_user_error_before_touching_jax(argv, message, monkeypatch):
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
  with pytest.raises(UserError, match=message):
    hosts.initialize(parse(*argv))
  assert not called


def test_no_flags_and_no_cluster_is_single_process(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hosts, "_running_on_cloud_tpu_vm", lambda: False)
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
  info = hosts.initialize(parse())
  assert (info.process_index, info.process_count, info.method) == (0, 1, "single")
  assert not called


def test_explicit_flags_and_detected_clusters_call_jax_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(hosts, "_current_info",
                      lambda method: hosts.DistributedInfo(1, 2, method, "h:1"))
  info = hosts.initialize(parse("--coordinator_address=h:1", "--process_count=2",
                                "--process_index=1", "--heartbeat_timeout=9"))
  assert info.method == "explicit"
  assert calls[-1] == dict(coordinator_address="h:1", num_processes=2, process_id=1,
                           initialization_timeout=hosts.DEFAULT_INITIALIZATION_TIMEOUT_S,
                           heartbeat_timeout_seconds=9,
                           shutdown_timeout_seconds=hosts.DEFAULT_SHUTDOWN_TIMEOUT_S)
  # A dict works as well as a Namespace, and keyword arguments override it.
  hosts.initialize({"coordinator_address": "h:1", "process_count": 2}, process_index=0)
  assert calls[-1]["process_id"] == 0
  # No flags inside `srun`: JAX's own auto-detection (no address passed).
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  for name, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2",
                          SLURM_PROCID="1", SLURM_LOCALID="0").items():
    monkeypatch.setenv(name, value)
  assert hosts.initialize().method == "slurm"
  assert "coordinator_address" not in calls[-1]
  assert calls[-1]["heartbeat_timeout_seconds"] == hosts.DEFAULT_HEARTBEAT_TIMEOUT_S


def test_initialize_is_idempotent(monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(hosts, "_current_info",
                      lambda method: hosts.DistributedInfo(1, 2, method, "h:1"))
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: pytest.fail("initialised twice"))
  args = parse("--coordinator_address=h:1", "--process_count=2", "--process_index=1")
  assert hosts.initialize(args).process_index == 1
  with pytest.raises(UserError, match="already initialised as process 1 of 2"):
    hosts.initialize(parse("--coordinator_address=h:1", "--process_count=2",
                           "--process_index=0"))


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "jax_env"),
    ({"SLURM_JOB_ID": "1"}, None),  # inside salloc but not srun: no task ids
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "x"}, "ompi"),
    ({"KUBERNETES_SERVICE_HOST": "k"}, None),  # a pod, but not an indexed job
    ({"KUBERNETES_SERVICE_HOST": "k", "JOB_COMPLETION_INDEX": "0"}, "kubernetes"),
])
def test_detect_cluster(env, expected):
  assert hosts.detect_cluster(env) == expected


def test_process_batch_size():
  assert hosts.process_batch_size(8) == 8  # one process here
  assert hosts.process_batch_size(8, process_count=4) == 2
  with pytest.raises(UserError, match="global batch size 6 is not divisible by the "
                     "process count 4"):
    hosts.process_batch_size(6, process_count=4)
  with pytest.raises(UserError):
    hosts.process_batch_size(0, process_count=1)


# ---------------------------------------------------------------- meshes and data

def test_global_mesh_single_slice(devices):
  mesh = hosts.global_mesh("data:-1,fsdp:2")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
  assert dict(hosts.global_mesh(None, devices=devices[:2]).shape)["data"] == 2


def fake_devices(num_slices, per_slice):
  return [types.SimpleNamespace(id=s * per_slice + i, slice_index=s, process_index=s,
                                platform="cpu", device_kind="cpu")
          for s in range(num_slices) for i in range(per_slice)]


def test_multi_slice_devices_split_the_data_axis():
  devs = fake_devices(num_slices=2, per_slice=4)
  assert hosts.num_slices(devs) == 2
  array = hosts.hybrid_device_array((4, 2, 1), devs)
  assert array.shape == (4, 2, 1)
  # The first half of the data axis is slice 0, the second slice 1: only the data-
  # parallel all-reduce crosses the slow network between slices.
  slices = np.vectorize(lambda d: d.slice_index)(array)
  np.testing.assert_array_equal(slices[:, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])
  assert sorted(d.id for d in array.flat) == list(range(8))
  with pytest.raises(UserError, match="data axis 1 is not a multiple of the 2 slices"):
    hosts.hybrid_device_array((1, 8, 1), devs)


def test_host_local_to_global_and_process_rows(devices):
  mesh = hosts.global_mesh("data:4,fsdp:2")
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "mask": np.arange(16) % 3 == 0}
  assert hosts.process_rows(mesh, 16) == slice(0, 16)
  batch = hosts.host_local_to_global(local, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  np.testing.assert_array_equal(np.asarray(batch["mask"]), local["mask"])
  assert {s.index[0].stop - s.index[0].start for s in batch["x"].addressable_shards} == {2}
  # A batch replicated over the devices (no batch axes in the spec) keeps its size.
  replicated = hosts.host_local_to_global(local, mesh, batch_spec=P())
  assert replicated["x"].shape == (16, 3)
  with pytest.raises(UserError, match="does not split into the 8 batch shards"):
    hosts.host_local_to_global({"x": np.zeros((12, 3))}, mesh)
  with pytest.raises(UserError, match="global batch size 12 does not split"):
    hosts.process_rows(mesh, 12)


def test_sync_global_devices_is_a_no_op_with_one_process():
  hosts.sync_global_devices("test")


def test_preemption_requested_after_sigterm_single_process():
  previous = signal.getsignal(signal.SIGTERM)
  with hosts.sigterm_requests_preemption():
    assert not hosts.preemption_requested(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert hosts.preemption_requested(1)
    assert hosts.preemption_requested(2)  # stays set: the loop saves and exits
  assert signal.getsignal(signal.SIGTERM) == previous      # handler restored
  with hosts.sigterm_requests_preemption():  # a new run starts unpreempted
    assert not hosts.preemption_requested(0)


# ---------------------------------------------------------------- checkpoint 4 -> 2 devices

def test_checkpoint_saved_on_4_devices_restores_onto_2(devices, tmp_path):
  """orbax writes each shard once; given target shardings, the restore re-shards."""
  import orbax.checkpoint as ocp
  mesh4 = mesh_lib.make_mesh("data:2,fsdp:2", devices=devices[:4])
  mesh2 = mesh_lib.make_mesh("fsdp:2", devices=devices[4:6])
  w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  state = {
      "w": jax.device_put(w, NamedSharding(mesh4, P(("data", "fsdp"), None))),
      "b": jax.device_put(jnp.arange(6.0), NamedSharding(mesh4, P("fsdp"))),
      "step": jax.device_put(np.int32(5), NamedSharding(mesh4, P())),
  }
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  target = {
      "w": jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                sharding=NamedSharding(mesh2, P(None, "fsdp"))),
      "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh2, P())),
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh2, P())),
  }
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(5, args=ocp.args.StandardRestore(target))
  np.testing.assert_array_equal(np.asarray(restored["w"]), w)
  np.testing.assert_array_equal(np.asarray(restored["b"]), np.arange(6.0))
  assert int(restored["step"]) == 5
  for name in target:
    assert restored[name].sharding == target[name].sharding
  assert {d.id for d in restored["w"].sharding.device_set} == {d.id for d in devices[4:6]}
  # Each of the 2 devices holds half the columns: really re-sharded, not replicated.
  assert {s.data.shape for s in restored["w"].addressable_shards} == {(8, 3)}


def test_fail_fast_exit_only_exits_with_several_processes():
  hosts.fail_fast_exit(0)
  hosts.fail_fast_exit(2)  # one process: returns, the caller exits normally
