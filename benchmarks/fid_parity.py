"""Our FID against pytorch-fid 0.3.0's, with the same random Inception weights and images.

  python benchmarks/fid_parity.py [--torch_python=/tmp/torchvenv/bin/python] [--n=50]

A check, not a test (torch must never be installed into this project's .venv; it runs in
its own virtualenv, as in benchmarks/imagen_pytorch_compare.py):

1. The torch side builds pytorch-fid's `InceptionV3([3])` (the FID blocks of
   `fid_inception_v3`) with random weights instead of the download: convolutions He-normal,
   BatchNorm weights, biases and running statistics random so that they matter. It saves
   the state dict with `torch.save` in the zip format and in the legacy format
   (`_use_new_zipfile_serialization=False`).
2. Two image sets from scikit-image's photos: N random 160x160 crops (upsampled to 299)
   and N noisy 360x360 crops (downsampled), written as PNGs.
3. pytorch-fid computes each set's statistics (`calculate_activation_statistics`, as its
   command does) and the FID; we compute them with `imagen_jax.eval` from both weight
   files. Targets: statistics within 1e-3 of their largest value, FID within 1%.
4. pytorch-fid's `calculate_frechet_distance` also reads our `.npz` files.
5. The torch reader on files torch wrote with every dtype and with views (a transpose, two
   slices of one storage), in both formats.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_TORCH_PYTHON = "/tmp/torchvenv/bin/python"


# --------------------------------------------------------------------------- torch side
def torch_weights(out: pathlib.Path, seed: int) -> dict:
  """Random FID-Inception weights, saved in both torch formats; returns their state dict."""
  import torch
  import torchvision
  torch.manual_seed(seed)
  # Same keys and shapes as fid_inception_v3(): the FID blocks subclass torchvision's.
  plain = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
  state = plain.state_dict()
  for key, value in state.items():
    if key.endswith("conv.weight"):
      fan_in = value[0].numel()
      state[key] = torch.randn_like(value) * (2.0 / fan_in) ** 0.5
    elif key.endswith("bn.weight"):
      state[key] = torch.rand_like(value) + 0.5
    elif key.endswith(("bn.bias", "bn.running_mean")):
      state[key] = torch.randn_like(value) * 0.2
    elif key.endswith("bn.running_var"):
      state[key] = torch.rand_like(value) * 1.5 + 0.5
  torch.save(state, out / "inception_zip.pth")
  torch.save(state, out / "inception_legacy.pth", _use_new_zipfile_serialization=False)
  return state


def torch_dtype_files(out: pathlib.Path) -> None:
  """Tensors of every dtype and layout the reader handles, saved by torch in both
  formats, and the values they must read as (float32 for bfloat16, which numpy lacks)."""
  import collections
  import torch
  torch.manual_seed(1)
  shared = torch.randn(20)
  tensors = collections.OrderedDict(
      f64=torch.randn(3, dtype=torch.float64), f32=torch.randn(2, 3),
      f16=torch.randn(4).half(), bf16=torch.randn(2, 2).to(torch.bfloat16),
      i64=torch.arange(5), i32=torch.arange(3, dtype=torch.int32),
      u8=torch.arange(4, dtype=torch.uint8), b=torch.tensor([True, False]),
      transposed=torch.randn(3, 5).t(), slice_a=shared[2:8].view(2, 3),
      slice_b=shared[10:14], scalar=torch.tensor(3.5))
  torch.save(tensors, out / "dtypes_zip.pth")
  torch.save(tensors, out / "dtypes_legacy.pth", _use_new_zipfile_serialization=False)
  np.savez(out / "dtypes_expected.npz",
           **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
              for k, v in tensors.items()})


def torch_worker(args) -> int:
  import torch
  # torchvision's compiled ops may not match the installed torch (a CPU torch beside a
  # CUDA torchvision): registering their fake kernels then fails at import. Nothing here
  # uses those ops (nms, roi_align, ...), so the registration is skipped.
  torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
  from pytorch_fid import fid_score, inception
  torch.set_num_threads(args.threads)
  if args.dtypes:
    torch_dtype_files(pathlib.Path(args.work))
    print(json.dumps({}))
    return 0
  if args.their_fid:
    stats = [fid_score.compute_statistics_of_path(p, None, 50, 2048, "cpu")
             for p in args.their_fid]
    print(json.dumps({"fid": float(fid_score.calculate_frechet_distance(*stats[0],
                                                                         *stats[1]))}))
    return 0
  out = pathlib.Path(args.work)
  state = torch_weights(out, args.seed)
  inception.load_state_dict_from_url = lambda *a, **k: state  # instead of the download
  model = inception.InceptionV3([3]).eval()
  result = {}
  for name in ("a", "b"):
    files = sorted((out / name).glob("*.png"))
    start = time.perf_counter()
    mu, sigma = fid_score.calculate_activation_statistics(files, model, batch_size=25,
                                                          dims=2048, num_workers=0)
    result[f"seconds_{name}"] = time.perf_counter() - start
    np.savez_compressed(out / f"theirs_{name}.npz", mu=mu, sigma=sigma)
  a, b = np.load(out / "theirs_a.npz"), np.load(out / "theirs_b.npz")
  result["fid"] = float(fid_score.calculate_frechet_distance(a["mu"], a["sigma"], b["mu"],
                                                             b["sigma"]))
  print(json.dumps(result))
  return 0


# --------------------------------------------------------------------------- images
def write_image_sets(out: pathlib.Path, n: int, seed: int) -> None:
  """a/: n crops 160x160 of skimage's colour photos; b/: n noisy crops 360x360."""
  import skimage.data
  from PIL import Image
  rng = np.random.default_rng(seed)
  photos = [np.asarray(Image.open(os.path.join(skimage.data.data_dir, name)).convert("RGB"))
            for name in ("astronaut.png", "hubble_deep_field.jpg", "coffee.png",
                         "rocket.jpg", "motorcycle_left.png", "retina.jpg")]
  for name, size, noise in (("a", 160, 0.0), ("b", 360, 12.0)):
    (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      photo = photos[i % len(photos)]
      top = rng.integers(0, photo.shape[0] - size + 1)
      left = rng.integers(0, photo.shape[1] - size + 1)
      crop = photo[top:top + size, left:left + size].astype(np.float64)
      crop = np.clip(crop + rng.normal(0, noise, crop.shape), 0, 255).astype(np.uint8)
      Image.fromarray(crop).save(out / name / f"{i:03d}.png")


# --------------------------------------------------------------------------- our side
def ours(out: pathlib.Path, weights_file: str) -> dict:
  from imagen_jax.eval import fid, inception
  start = time.perf_counter()
  model = inception.load_inception(out / weights_file)
  extractor = fid.FeatureExtractor(model, batch_size=25)
  result = {"load_seconds": time.perf_counter() - start}
  stats = {}
  for name in ("a", "b"):
    start = time.perf_counter()
    stats[name], _ = fid.statistics_of(out / name, extractor, progress=False)
    result[f"seconds_{name}"] = time.perf_counter() - start
    fid.save_statistics(out / f"ours_{name}.npz", *stats[name])
  result["fid"] = fid.frechet_distance(*stats["a"], *stats["b"])
  return result


def relative_error(ours_file: pathlib.Path, theirs_file: pathlib.Path) -> dict:
  mine, theirs = np.load(ours_file), np.load(theirs_file)
  return {k: float(np.max(np.abs(mine[k] - theirs[k])) / np.max(np.abs(theirs[k])))
          for k in ("mu", "sigma")}


def check_dtypes(args, out: pathlib.Path) -> bool:
  from imagen_jax import weights
  run_torch(args, "--dtypes")
  expected = np.load(out / "dtypes_expected.npz")
  ok = True
  for fmt in ("zip", "legacy"):
    got = weights.read_state_dict(out / f"dtypes_{fmt}.pth")
    same = sorted(got) == sorted(expected.files) and all(
        np.array_equal(got[k].astype(expected[k].dtype), expected[k])
        and got[k].shape == expected[k].shape for k in expected.files)
    print(f"torch reader, {fmt} file written by torch: {len(got)} tensors "
          f"({', '.join(sorted({str(v.dtype) for v in got.values()}))}) "
          f"{'equal' if same else 'DIFFERENT'}")
    ok &= same
  return ok


def run_torch(args, *extra) -> dict:
  cmd = [args.torch_python, os.path.abspath(__file__), "--torch_worker", "--work",
         args.work, "--seed", str(args.seed), "--threads", str(args.threads), *extra]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    sys.stderr.write(done.stderr)
    raise SystemExit(f"the torch side failed ({' '.join(cmd)})")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON)
  p.add_argument("--n", type=int, default=50, help="images per set")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--work", default="")
  p.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--their_fid", nargs=2, help=argparse.SUPPRESS)
  p.add_argument("--dtypes", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.torch_worker:
    return torch_worker(args)
  args.work = args.work or tempfile.mkdtemp(prefix="fid_parity_")
  out = pathlib.Path(args.work)
  cached = out / "theirs.json"  # a rerun with the same --work reuses the torch side
  if cached.exists():
    theirs = json.loads(cached.read_text())
  else:
    write_image_sets(out, args.n, args.seed)
    theirs = run_torch(args)
    cached.write_text(json.dumps(theirs))
  print(f"pytorch-fid 0.3.0: FID {theirs['fid']:.6f}  ({theirs['seconds_a']:.1f} s, "
        f"{theirs['seconds_b']:.1f} s for the two sets of {args.n})")
  ok = True
  for weights_file in ("inception_zip.pth", "inception_legacy.pth"):
    mine = ours(out, weights_file)
    rel = abs(mine["fid"] - theirs["fid"]) / abs(theirs["fid"])
    errors = {name: relative_error(out / f"ours_{name}.npz", out / f"theirs_{name}.npz")
              for name in ("a", "b")}
    worst = max(e for per_set in errors.values() for e in per_set.values())
    ok &= rel < 0.01 and worst < 1e-3
    print(f"ours ({weights_file}): FID {mine['fid']:.6f}, relative difference {rel:.2e}; "
          f"statistics' largest difference / largest value: " +
          ", ".join(f"{s}.{k} {v:.2e}" for s, per in errors.items() for k, v in per.items())
          + f"  ({mine['seconds_a']:.1f} s, {mine['seconds_b']:.1f} s)")
  cross = run_torch(args, "--their_fid", str(out / "ours_a.npz"), str(out / "ours_b.npz"))
  print(f"pytorch-fid on our .npz files: FID {cross['fid']:.6f}")
  ok &= check_dtypes(args, out)
  print("PASS" if ok else "FAIL", f"(work files in {out})")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
