"""The COCO caption draw and the guidance sweep's loop, table and plot."""

import json

import numpy as np
import pytest

from imagen_jax.errors import UserError
from imagen_jax.eval import coco, sweep
from imagen_jax.sample import output


def _annotations(tmp_path, n=50, shuffle_seed=0):
  rows = [{"id": 1000 + i, "image_id": i // 5, "caption": f"  a photo\nnumber {i} "}
          for i in range(n)]
  np.random.default_rng(shuffle_seed).shuffle(rows)
  images = [{"id": j, "file_name": f"COCO_val2014_{j:012d}.jpg"} for j in range(n // 5)]
  path = tmp_path / f"captions_{shuffle_seed}.json"
  path.write_text(json.dumps({"images": images, "annotations": rows}))
  return path


def test_draw_is_a_pure_function_of_file_num_and_seed(tmp_path):
  a = coco.read_captions(_annotations(tmp_path, shuffle_seed=0))
  b = coco.read_captions(_annotations(tmp_path, shuffle_seed=1))  # same rows, other order
  drawn = coco.draw_captions(a, 20, seed=3)
  assert drawn == coco.draw_captions(b, 20, seed=3)
  assert drawn != coco.draw_captions(a, 20, seed=4)
  assert len({row.annotation_id for row in drawn}) == 20  # without replacement
  assert all(row.caption.startswith("a photo number") for row in drawn)  # whitespace folded
  assert drawn[0].file_name == f"COCO_val2014_{drawn[0].image_id:012d}.jpg"


def test_written_prompts_read_back_in_order(tmp_path):
  drawn = coco.draw_captions(coco.read_captions(_annotations(tmp_path)), 7, seed=0)
  coco.write_prompts(tmp_path / "coco.txt", drawn)
  assert output.read_prompts(tmp_path / "coco.txt") == [row.caption for row in drawn]
  meta = json.loads((tmp_path / "coco.txt.json").read_text())
  assert [m["annotation_id"] for m in meta] == [row.annotation_id for row in drawn]


def test_bad_annotation_files(tmp_path):
  with pytest.raises(UserError, match="missing"):
    coco.read_captions(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"annotations": []}))
  with pytest.raises(UserError, match="not a COCO captions file"):
    coco.read_captions(bad)
  captions = coco.read_captions(_annotations(tmp_path, n=10))
  with pytest.raises(UserError, match="--num=11"):
    coco.draw_captions(captions, 11)


def test_sweep_resumes_and_reports(tmp_path):
  calls = []

  def sample(w, directory):
    calls.append(w)
    directory.mkdir(parents=True, exist_ok=True)

  def evaluate(directory):
    w = float(directory.name[1:])
    return 30.0 / (1 + w), 20.0 + w  # a made-up Pareto front

  points = sweep.run_sweep([1.0, 3.0, 7.5], sample, evaluate, tmp_path)
  assert calls == [1.0, 3.0, 7.5]
  again = sweep.run_sweep([1.0, 3.0, 7.5], sample, evaluate, tmp_path)
  assert calls == [1.0, 3.0, 7.5] and again == points  # all three read back
  sweep.write_report(points, tmp_path)
  assert "| 7.5 | 3.53 | 27.50 |" in (tmp_path / "sweep.md").read_text()
  image = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "fid_vs_clip.png"))
  red = (image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)
  ys, xs = np.nonzero(red)
  # The highest-FID point (w=1) is drawn left of and above the lowest (w=7.5).
  assert xs.min() < 150 and xs.max() > 450 and red.sum() > 3 * 30
  assert ys[xs < xs.min() + 10].mean() < ys[xs > xs.max() - 10].mean() - 200


def test_parse_weights():
  assert sweep.parse_weights("1,3, 5.5") == [1.0, 3.0, 5.5]
  for bad in ("", "1,x", "-1", "2,2"):
    with pytest.raises(UserError, match="--guidance"):
      sweep.parse_weights(bad)


# ---------------------------------------------------------------------------------------
# The commands, with the small random Inception and CLIP of the FID and CLIP tests.

from test_eval_clip import clip_dir, write_samples  # noqa: E402,F401  (shared fixtures)
from test_eval_fid import _photos, weights_file  # noqa: E402,F401

from imagen_jax.cli import eval as eval_cli  # noqa: E402
from imagen_jax.cli import sample as sample_cli  # noqa: E402
from imagen_jax.eval import fid  # noqa: E402
from etils import epath  # noqa: E402


def test_coco_prompts_command(tmp_path, capsys):
  path = _annotations(tmp_path)
  out = tmp_path / "p.txt"
  assert eval_cli.main(["coco_prompts", f"--annotations={path}", f"--out={out}",
                        "--num=12", "--seed=5"]) == 0
  drawn = coco.draw_captions(coco.read_captions(path), 12, seed=5)
  assert output.read_prompts(out) == [row.caption for row in drawn]
  assert eval_cli.main(["coco_prompts", f"--annotations={path}", f"--out={out}",
                        "--num=0"]) == 2
  assert "--num=0" in capsys.readouterr().err


def test_reference_statistics_are_cropped_resized_and_cached(tmp_path, weights_file, capsys):
  folder = tmp_path / "val2014"
  sizes = [(40, 56), (64, 48), (33, 33)]  # real photos come in several sizes
  for i, photo in enumerate(_photos(3, 64, seed=1)):
    h, w = sizes[i]
    output.write_png(folder / f"COCO_val2014_{i:012d}.png", photo[:h, :w])
  out = tmp_path / "ref.npz"
  args = ["reference", f"--images={folder}", "--resolution=16",
          f"--weights={weights_file[0]}", f"--out={out}", "--no_progress", "--batch_size=8"]
  assert eval_cli.main(args) == 0
  assert "wrote the statistics of 3 images at 16 px" in capsys.readouterr().out
  mu, sigma = fid.load_statistics(out)  # pytorch-fid's keys, read by ours
  images = coco.reference_images(folder, 16)
  assert all(images[i].shape == (16, 16, 3) for i in range(3))
  out.write_bytes(out.read_bytes())  # unchanged file: reused, not recomputed
  assert eval_cli.main(args) == 0
  assert "reused" in capsys.readouterr().out
  assert eval_cli.main(args[:2] + ["--resolution=32"] + args[3:]) == 2
  assert "not 3 at 32 px" in capsys.readouterr().err
  assert mu.shape[0] == sigma.shape[0] > 0


def test_sweep_command_samples_and_scores_each_weight(tmp_path, weights_file, clip_dir,
                                                     monkeypatch, capsys):
  prompts = ["a red square", "a blue circle", "a green triangle"]
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  real = tmp_path / "real"
  for i, photo in enumerate(_photos(4, 16, seed=2)):
    output.write_png(real / f"{i}.png", photo)
  ref = tmp_path / "ref.npz"
  assert eval_cli.main(["reference", f"--images={real}", "--resolution=16",
                        f"--weights={weights_file[0]}", f"--out={ref}", "--no_progress", "--batch_size=8"]) == 0
  calls = []

  def fake_sample(argv):  # imagen-sample has its own tests; here: what the sweep asks of it
    calls.append(argv)
    directory = next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))
    write_samples(epath.Path(directory), prompts, seed=len(calls))

  monkeypatch.setattr(sample_cli, "_main", fake_sample)
  out = tmp_path / "sweep"
  argv = ["sweep", "--gin.base/Stage.num_steps=3", f"--prompts={tmp_path / 'p.txt'}",
          "--guidance=1,4", f"--reference={ref}", f"--weights={weights_file[0]}",
          f"--clip={clip_dir}", f"--out_dir={out}", "--no_progress", "--batch_size=8"]
  assert eval_cli.main(argv) == 0
  assert [a for a in calls[1] if "guidance" in a] == ["--gin_bindings=base/Stage.guidance_scale = 4.0"]
  assert "--gin_bindings=base/Stage.num_steps = 3" in calls[0]
  points = json.loads((out / "sweep.json").read_text())
  assert [p["guidance"] for p in points] == [1.0, 4.0]
  assert all(p["fid"] > 0 and 0 <= p["clip_score"] <= 100 for p in points)
  assert points[0]["fid"] != points[1]["fid"]  # other images, other figure
  assert (out / "fid_vs_clip.png").exists()
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"] == points
  assert eval_cli.main(argv) == 0 and len(calls) == 2  # resumed: nothing sampled again


def test_train_eval_every_logs_fid_and_clip_score(tmp_path, weights_file, clip_dir):
  import test_train_lib as lib
  from imagen_jax.eval import in_training
  from imagen_jax.eval import inception
  from imagen_jax.train import loop

  class Captioned(lib.FakePipeline):
    def example(self, index):
      return {"caption": f"a flat colour number {index % 97}"}

  real = np.concatenate([Captioned(8).host_batch(k)["image"] for k in range(2)])
  extractor = fid.FeatureExtractor(inception.load_inception(weights_file[0]), batch_size=8)
  ref = tmp_path / "ref.npz"
  fid.save_statistics(ref, *fid.feature_statistics(extractor(list(real), progress=False)))
  config = in_training.TrainingEval(
      reference_stats=str(ref), inception_weights=str(weights_file[0]),
      clip_dir=str(clip_dir), num_images=10, batch_size=8)  # two batches of 8, the last cut
  out = loop.train(model_dir=str(tmp_path / "run"), dataset=None, batch_size=8,
                   train_steps=2, eval_every=2, training_eval=config, sample_steps=2,
                   log_every=1,
                   checkpoint_every=2, progress=False, tensorboard=False,
                   create_model_fn=lib.tiny_create(), pipeline=Captioned(8))
  metrics = out["metrics"]
  assert np.isfinite(metrics["eval/fid"]) and metrics["eval/fid"] > 0
  assert 0 <= metrics["eval/clip_score"] <= 100
  with pytest.raises(UserError, match="neither reference_stats"):
    in_training.TrainingEval(reference_stats=None, clip_dir=None)
