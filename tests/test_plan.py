"""imagen-plan: abstract planning of a train step (issue 3)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from imagen_jax import config
from imagen_jax.cli import plan as plan_cli
from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(gin_files, mesh_spec, bindings=(), **kw):
  config.parse_gin(gin_files, bindings)
  shape = mesh_lib.parse_mesh_spec(mesh_spec)
  mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:plan_lib.devices_for(shape)])
  settings = plan_lib.gin_settings(kw.pop("batch_size", None))
  return plan_lib.plan_training(mesh, **settings, **kw)


@pytest.fixture(scope="module")
def tiny_plans():
  """The tiny base model on one device (lowered only) and on fsdp 4 x tensor 2 (compiled:
  one compile keeps the suite fast). One residual block per level and 16 text tokens
  halve the program XLA partitions and compiles; the layout checks do not need more."""
  import gin
  plans = {}
  smaller = ["UNet.num_res_blocks = 1", "MAX_LENGTH = 16"]
  for spec, compile_step in (("data:1", False), ("fsdp:4,tensor:2", True)):
    gin.clear_config()
    plans[spec] = _plan(["models/tiny_base.gin"], spec, smaller, batch_size=8,
                        compile_step=compile_step)
  return plans


@pytest.mark.slow
def test_base_2b_params_within_10_percent_without_allocating():
  plan = _plan(["models/imagen_base64_2b.gin"], "data:1", compile_step=False)
  assert abs(plan["params"] - 2e9) / 2e9 < 0.10, plan["params"]
  # float32 parameters, EMA of the same size, Adam keeps two moments.
  assert plan["param_bytes_per_device"] == 4 * plan["params"]
  assert plan["ema_bytes_per_device"] == plan["param_bytes_per_device"]
  assert plan["opt_state_bytes_per_device"] >= 2 * plan["param_bytes_per_device"]
  # A training step costs at least 3 forward passes' worth over 2 FLOPs per parameter.
  assert plan["model_flops_per_example"] > 6 * plan["params"]
  assert plan["remat"] and plan["train_flops_per_example"] > plan["model_flops_per_example"]


@pytest.mark.slow
def test_fsdp_and_tensor_shard_the_state(tiny_plans):
  one, eight = tiny_plans["data:1"], tiny_plans["fsdp:4,tensor:2"]
  assert one["params"] == eight["params"]
  # FLOPs are a property of the global program, not of the layout.
  assert one["train_flops_per_example"] == pytest.approx(eight["train_flops_per_example"],
                                                         rel=0.05)
  # Sharded 8 ways (with a few small replicated weights): well under half per device.
  assert eight["param_bytes_per_device"] < 0.5 * one["param_bytes_per_device"]
  assert eight["opt_state_bytes_per_device"] < 0.5 * one["opt_state_bytes_per_device"]
  assert eight["bytes_per_device"] >= eight["step_argument_bytes"] > 0
  assert eight["bytes_per_device"] == (eight["step_argument_bytes"] + eight["step_output_bytes"]
                                       - eight["step_alias_bytes"] + eight["step_temp_bytes"])
  # The donated state is aliased to the new state, not counted twice.
  assert eight["step_alias_bytes"] >= eight["state_bytes_per_device"] // 2
  assert "estimate" in eight["memory_note"]
  assert one["bytes_per_device"] == one["state_bytes_per_device"]  # not compiled


def test_batch_not_divisible_by_batch_axes():
  with pytest.raises(UserError, match=r"global batch 6 .* data-parallel size 4"):
    _plan(["models/tiny_base.gin"], "data:2,fsdp:2", batch_size=6, compile_step=False)


def test_image_size_the_unet_cannot_divide():
  with pytest.raises(UserError, match="image size|not a multiple"):
    _plan(["models/tiny_base.gin"], "data:1", ["IMAGE_SIZE = 18"], compile_step=False)


def test_unknown_axis_is_one_line_exit_2(capsys):
  assert plan_cli.main(["--gin_file=models/tiny_base.gin", "--mesh=data:2,model:4"]) == 2
  err = capsys.readouterr().err
  assert "unknown mesh axis 'model'" in err and len(err.strip().splitlines()) == 1


def test_minus_one_is_rejected_when_planning():
  with pytest.raises(UserError, match="-1"):
    plan_lib.devices_for({"data": -1})


def test_cli_json_in_its_own_process_simulates_the_mesh_devices():
  """The CLI sets the device count from --mesh before jax starts (here 2 x 2 = 4)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "imagen_jax.cli.plan", "--gin_file=models/tiny_base.gin",
       "--mesh=data:2,tensor:2", "--batch=4", "--json", "--no_compile"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  plan = json.loads(lines[0])
  assert isinstance(plan["params"], int) and plan["params"] > 1e6
  assert isinstance(plan["bytes_per_device"], int)
  assert plan["train_flops_per_example"] > 0
  assert plan["devices"] == 4 and plan["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}


def test_plan_takes_its_settings_as_arguments_and_gin_settings_reads_the_run():
  """plan_training reads no gin binding of the run (train.*, macros); gin_settings does."""
  from imagen_jax.train import loop  # noqa: F401  (registers train.*)
  config.parse_gin(["models/tiny_base.gin"], ["train.micro_batches = 3", "MAX_LENGTH = 16",
                                             "BATCH_SIZE = 12"])
  settings = plan_lib.gin_settings()
  assert settings["micro_batches"] == 3 and settings["text_length"] == 16
  assert (settings["batch_size"], settings["batch_source"]) == (12, "BATCH_SIZE")
  assert plan_lib.gin_settings(8)["batch_size"] == 8
  mesh = mesh_lib.make_mesh("data:2", devices=jax.devices()[:2])
  # The binding says 3 micro-batches; the argument says 5, which does not divide 4 rows.
  with pytest.raises(UserError, match="micro_batches=5"):
    plan_lib.plan_training(mesh, batch_size=8, micro_batches=5, compile_step=False)


def test_micro_batches_count_every_micro_batchs_flops(tiny_plans):
  """XLA's cost analysis counts a loop's body once; the plan counts the FLOPs of all the
  micro-batches (the whole batch), not of one."""
  import gin
  from imagen_jax.train import loop  # noqa: F401  (registers train.*)
  gin.clear_config()
  plan = _plan(["models/tiny_base.gin"], "data:1",
               ["UNet.num_res_blocks = 1", "MAX_LENGTH = 16", "train.micro_batches = 4"],
               batch_size=8, compile_step=False)
  assert plan["train_flops_per_example"] == pytest.approx(
      tiny_plans["data:1"]["train_flops_per_example"], rel=0.02)


def test_plans_the_experiments_optimizer(tiny_plans, capsys):
  """imagen-plan reads an experiment file as it is (its run macros, MODEL_DIR and the
  others, unset) and builds the optimizer the run configures, so the state bytes are the
  run's: Adafactor keeps one second moment (factored for large matrices), Adam two."""
  adam = tiny_plans["data:1"]
  assert plan_cli.main(["--gin_file=experiments/tiny_base.gin", "--mesh=data:1", "--batch=8",
                        "--gin.make_optimizer.name='adafactor'", "--no_compile",
                        "--gin.UNet.num_res_blocks=1", "--gin.MAX_LENGTH=16",  # the fixture's
                        "--json"]) == 0
  plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (adam["optimizer"], plan["optimizer"]) == ("adam", "adafactor")
  assert plan["params"] == adam["params"]
  assert adam["opt_state_bytes_per_device"] >= 2 * adam["param_bytes_per_device"]
  assert plan["opt_state_bytes_per_device"] <= 0.6 * adam["opt_state_bytes_per_device"]
