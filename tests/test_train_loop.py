"""The training loop: exact resumption (after SIGTERM and after SIGKILL), the NaN guard,
checkpoint contents. All runs share one tiny program (persistent compilation cache)."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import test_train_lib as lib
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import loop
from imagen_jax.train import step as step_lib

STEPS, BATCH = 6, 16
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _train(model_dir, pipeline=None, **kw):
  kw = {"train_steps": STEPS, "checkpoint_every": 2, "log_every": 1, "progress": False,
        "val_every": STEPS, "val_pipeline": lib.FakePipeline(BATCH), **kw}
  return loop.train(model_dir=str(model_dir), dataset=None, batch_size=BATCH,
                    create_model_fn=lib.tiny_create(), pipeline=pipeline or
                    lib.FakePipeline(BATCH), **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """STEPS steps in one uninterrupted run."""
  model_dir = tmp_path_factory.mktemp("reference")
  out = _train(model_dir, sample_every=STEPS, sample_steps=3, num_samples=4)
  assert out["status"] == "done" and out["step"] == STEPS
  return model_dir, jax.device_get(out["state"]), out["metrics"]


def _raise_sigterm_at(step):
  def hook(s):
    if s == step:
      os.kill(os.getpid(), signal.SIGTERM)
  return hook


def test_sigterm_saves_and_resume_is_bit_exact(tmp_path, reference):
  _, ref, ref_metrics = reference
  before = signal.getsignal(signal.SIGTERM)
  # SIGTERM arrives while the batch of step index 2 is loaded: the loop finishes that step,
  # saves step 3 (not a multiple of checkpoint_every) and returns.
  out = _train(tmp_path, lib.FakePipeline(BATCH, on_step=_raise_sigterm_at(2)))
  assert out["status"] == "preempted" and out["step"] == 3
  assert signal.getsignal(signal.SIGTERM) == before      # handler restored
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  assert checkpointer.all_steps() == [2, 3]
  checkpointer.close()
  resumed = _train(tmp_path)
  assert resumed["status"] == "done" and resumed["step"] == STEPS
  state = jax.device_get(resumed["state"])
  assert lib.params_equal(state.params, ref.params)
  assert lib.params_equal(state.ema_params, ref.ema_params)
  assert lib.params_equal(state.opt_state, ref.opt_state)
  assert int(state.step) == STEPS and np.array_equal(state.rng, ref.rng)
  # The first resumed step really was step 4 (the history starts there).
  assert resumed["history"][0]["step"] == 4
  # Validation at fixed noise levels: equal parameters give an equal validation loss.
  assert np.isfinite(ref_metrics["val_loss"]) and np.isfinite(ref_metrics["val_loss_ema"])
  assert resumed["metrics"]["val_loss"] == ref_metrics["val_loss"]
  assert resumed["metrics"]["val_loss_ema"] == ref_metrics["val_loss_ema"]
  assert ref_metrics["val_loss"] != ref_metrics["val_loss_ema"]


def test_time_limit_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, reference,
                                                                monkeypatch):
  """train.max_minutes: past the deadline the loop stops at the next time check with a
  checkpoint and status "time_limit"; running again finishes exactly like one run."""
  _, ref, _ = reference
  monkeypatch.setattr(loop, "TIME_CHECK_EVERY", 3)
  out = _train(tmp_path, max_minutes=1e-9)  # past the deadline at the first check
  assert out["status"] == "time_limit" and out["step"] == 3
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  assert checkpointer.latest_step() == 3
  checkpointer.close()
  resumed = _train(tmp_path, max_minutes=60.0)
  assert resumed["status"] == "done" and resumed["step"] == STEPS
  assert lib.params_equal(jax.device_get(resumed["state"]).params, ref.params)
  with pytest.raises(loop.UserError, match="max_minutes must be > 0"):
    _train(tmp_path / "bad", max_minutes=0)


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, reference):
  """The batch of step index 4 (the 5th step) has NaN text embeddings, so a NaN loss: that
  step changes nothing, is counted, and the run goes on."""
  ref_dir, ref, _ = reference
  out = _train(tmp_path, lib.FakePipeline(BATCH, nan_steps={4}), tensorboard=False,
               checkpoint_every=1)
  assert out["status"] == "done" and out["step"] == STEPS
  by_step = {h["step"]: h for h in out["history"]}
  assert [by_step[s]["nonfinite_steps"] for s in (4, 5, 6)] == [0, 1, 0]
  assert np.isfinite(by_step[6]["loss"])

  def params_at(model_dir, step, use_ema):
    target = ckpt_lib.state_lib.abstract_like(ref.params)
    return ckpt_lib.restore_params(model_dir, target, step=step, use_ema=use_ema)[0]

  for ema in (False, True):  # steps 1-4 are the reference's; step 5 changed nothing
    four = params_at(tmp_path, 4, ema)
    assert lib.params_equal(four, params_at(ref_dir, 4, ema))
    assert lib.params_equal(params_at(tmp_path, 5, ema), four)
    assert not lib.params_equal(params_at(tmp_path, 6, ema), four)  # a real update again
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"])))


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
  # Step indices 3 and 4 (steps 4 and 5) are NaN: two in a row stop the run at step 5.
  with pytest.raises(loop.TrainingDiverged, match=r"2 steps in a row, up to step 5.*last "
                     r"good checkpoint \(step 4\)"):
    _train(tmp_path, lib.FakePipeline(BATCH, nan_steps={3, 4}), tensorboard=False,
           max_nonfinite_steps=2)
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  assert checkpointer.all_steps() == [2, 4]
  checkpointer.close()
  meta = json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["step"] == 4 and np.isfinite(meta["loss"])


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_train_lib as lib
    from imagen_jax.train import loop
    loop.train(model_dir={model_dir!r}, train_steps={steps}, dataset=None, batch_size={batch},
               checkpoint_every=2, log_every=1, progress=False, tensorboard=False,
               create_model_fn=lib.tiny_create(),
               pipeline=lib.FakePipeline({batch}, delay=1.0))
    print("FINISHED")
""")


def test_sigkill_then_restart_is_bit_exact(tmp_path, reference):
  _, ref, _ = reference
  script = tmp_path / "run.py"
  model_dir = tmp_path / "run"
  script.write_text(_KILL_SCRIPT.format(tests=TESTS_DIR, model_dir=str(model_dir),
                                        steps=STEPS, batch=BATCH))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=os.environ.copy())
  first = model_dir / "checkpoints" / "2"
  deadline = time.time() + 240
  try:
    while not (first / "commit_success.txt").exists():
      if proc.poll() is not None:
        pytest.fail("training subprocess ended early:\n" + proc.stdout.read().decode()[-3000:])
      if time.time() > deadline:
        pytest.fail("no checkpoint within 240 s")
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0].decode()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert "FINISHED" not in out and proc.returncode == -signal.SIGKILL
  checkpointer = ckpt_lib.Checkpointer(model_dir)
  killed_at = checkpointer.latest_step()
  checkpointer.close()
  assert killed_at is not None and 2 <= killed_at < STEPS
  resumed = _train(model_dir)
  assert resumed["history"][0]["step"] == killed_at + 1
  state = jax.device_get(resumed["state"])
  assert lib.params_equal(state.params, ref.params)
  assert lib.params_equal(state.ema_params, ref.ema_params)


def test_tensorboard_writer_does_not_import_tensorflow(tmp_path):
  code = textwrap.dedent(f"""\
      import sys
      import numpy as np
      from imagen_jax.train import metrics
      writer = metrics.create_writer({str(tmp_path)!r})
      writer.write_hparams({{"batch_size": 8, "mesh": {{"data": 2}}}})
      writer.write_scalars(1, {{"loss": 0.5}})
      writer.write_images(1, {{"grid": np.zeros((2, 4, 4, 3), np.float32)}})
      writer.close()
      print("tensorflow" in sys.modules)""")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  events.Reload()
  assert events.Tags()["images"] == ["grid/0", "grid/1"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]


def test_run_directory_files(reference):
  model_dir, ref, last = reference
  info = json.loads((model_dir / "model.json").read_text())
  assert info["model_class"] == "TinyNet" and info["text_dim"] == 8
  assert info["image_size"] == 8 and info["lowres_size"] is None
  assert info["objective"] == "eps" and info["format_version"] == ckpt_lib.FORMAT_VERSION
  assert (model_dir / "config.gin").exists() and (model_dir / "model.gin").exists()
  assert any((model_dir / "tb").iterdir())
  # The EMA sample grid: a row of 4 samples over a row of their training images, 8 px
  # images enlarged 8x.
  from PIL import Image
  grid = np.asarray(Image.open(model_dir / "samples" / f"step_{STEPS:08d}.png"))
  assert grid.shape == (2 * 8 * 8, 4 * 8 * 8, 3)
  truth = lib.FakePipeline(BATCH).host_batch(0)["image"][:4]
  np.testing.assert_array_equal(grid[64::8, ::8][:8].reshape(8, 4, 8, 3).transpose(1, 0, 2, 3),
                                truth)
  # TensorBoard reads back every logged loss, the grid and the hyperparameters.
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(model_dir / "tb"), size_guidance={
      event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0})
  events.Reload()
  losses = {e.step: e.value for e in events.Scalars("loss")}
  assert sorted(losses) == list(range(1, STEPS + 1))  # log_every=1
  assert losses[STEPS] == pytest.approx(last["loss"], rel=1e-6)
  (image,) = events.Images("samples")
  assert image.step == STEPS
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                grid)
  assert "_hparams_/session_start_info" in events.Tags()["tensors"]
  # keep_checkpoints=3 by default: of 2, 4, 6 all remain; the last holds the final state.
  checkpointer = ckpt_lib.Checkpointer(model_dir)
  assert checkpointer.all_steps() == [2, 4, 6]
  checkpointer.close()
  target = ckpt_lib.state_lib.abstract_like(ref.ema_params)
  ema, step = ckpt_lib.restore_params(model_dir, target, use_ema=True)
  assert step == STEPS and lib.params_equal(ema, ref.ema_params)


def test_due():
  assert [s for s in range(1, 10) if loop.due(s, 3)] == [3, 6, 9]
  assert not any(loop.due(s, every) for s in range(1, 10) for every in (0, None, -1))


def test_progress_bar_counts_finished_steps(tmp_path, monkeypatch):
  """The bar advances when a step's metrics are fetched, one step behind the dispatch: when
  the batch of step index k is loaded (steps 1..k dispatched), it shows k - 1 steps."""
  import tqdm

  class Bar:
    def __init__(self, *args, initial=0, **kw):
      self.n = initial
      bars.append(self)

    def update(self, n):
      self.n += n

    def write(self, line):
      pass

    def close(self):
      pass

  bars, seen = [], {}
  monkeypatch.setattr(tqdm, "tqdm", Bar)

  def on_step(k):
    seen[k] = bars[0].n if bars else None

  out = _train(tmp_path, lib.FakePipeline(BATCH, on_step=on_step), checkpoint_every=100,
               log_every=100, val_every=0, progress=True, tensorboard=False)
  assert out["step"] == STEPS and bars[0].n == STEPS
  assert [seen[k] for k in range(2, STEPS)] == list(range(1, STEPS - 1))


def test_cpu_peak_is_the_machines_split_between_its_simulated_devices(monkeypatch):
  """A matmul on one simulated CPU device uses every core, so MFU must not count that peak
  once per device (with 2 devices on 2 cores it read half the one-device figure)."""
  monkeypatch.setattr(loop.metrics_lib, "measured_peak_flops", lambda dtype, n: 8e11)
  assert jax.local_device_count() > 1
  assert loop._peak_flops(None, 1e9) == 8e11 / jax.local_device_count()
  assert loop._peak_flops(5e12, 1e9) == 5e12  # train.peak_flops_per_device wins
  assert loop._peak_flops(None, None) is None  # no model FLOPs, no MFU


def test_model_flops_count_the_whole_batch_with_the_flat_gradient_sum(tmp_path):
  """On several CPU devices the step sums gradients inside a shard_map, whose body is one
  device's program; the FLOPs behind MFU are still those of the whole batch's step."""
  outs = [_train(tmp_path / f"d{n}", train_steps=1, checkpoint_every=1, val_every=0,
                 num_devices=n) for n in (1, jax.device_count())]
  assert outs[1]["num_devices"] > 1 and outs[0]["model_flops"] > 0
  assert outs[1]["model_flops"] == pytest.approx(outs[0]["model_flops"], rel=0.02)


def test_model_flops_count_every_micro_batch_where_they_run_in_a_loop(tmp_path,
                                                                      monkeypatch):
  """On TPUs and GPUs the micro-batches run in a lax.scan, whose body XLA's cost analysis
  counts once; the FLOPs behind MFU are still the whole batch's. The accelerators' choice
  (a loop unless asked to unroll) is forced here, since CPU unrolls by default."""
  monkeypatch.setattr(step_lib, "_unrolls_micro_batches", lambda unroll: bool(unroll))
  one, two = [_train(tmp_path / f"m{m}", train_steps=1, checkpoint_every=1, val_every=0,
                     num_devices=1, micro_batches=m) for m in (1, 2)]
  assert one["model_flops"] > 0
  assert two["model_flops"] == pytest.approx(one["model_flops"], rel=0.02)
