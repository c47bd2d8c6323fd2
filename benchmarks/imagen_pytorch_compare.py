"""Training throughput of our U-Net against lucidrains' imagen-pytorch on the same shape.

  python benchmarks/imagen_pytorch_compare.py --gin_file=models/tiny_base.gin --batch=32 \
      [--torch_python=/tmp/torchvenv/bin/python] [--rounds=4] [--steps=5]

A benchmark, not a test. imagen-pytorch lives in its own virtual environment (torch must
never be installed into this project's .venv):

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 imagen-pytorch==2.1.0

Both sides run a full training step on random data of the same batch and image size, with
random text embeddings (text_dim of the gin model, `--text_length` tokens, random caption
lengths): forward, MSE against the noise, backward, global-norm clipping at 1, Adam and an
EMA update. Ours is `train.step.make_train_step` (jitted; it also draws the noise levels,
noise and caption dropout inside the step). Theirs is `imagen_pytorch.Unet` called the way
`imagen_pytorch.Imagen` calls it in training (continuous times, cond_drop_prob 0.1), in
float32 with `torch.set_num_threads(--threads)`. Ours is data parallel over the JAX devices
as in imagen-train: with XLA_FLAGS=--xla_force_host_platform_device_count=N (one CPU device
per core, as launch/quickstart.sh sets) the batch is split over N devices; by default XLA
has one device and splits each operation over the cores' threads.

Their U-Net is built from our gin shape: dim = model_channels, dim_mults = channel_mult,
num_resnet_blocks = num_res_blocks, self- and cross-attention at the levels whose
resolution is in attention_resolutions, attn_dim_head = head_dim (at least 2 heads: their
minimum), text_embed_dim = text_dim; everything else is imagen-pytorch's default (its
cross-embed input conv, global-context attention, attention-pooled text latents,
pixel-shuffle upsampling...), so the parameter counts differ; both are printed.

Each side is built and compiled once, then timed in alternating rounds (ours, theirs,
ours, theirs, ...); the report gives each side's median and the ratio of examples/s.
`--profile` then profiles `--steps` of their steps with torch.profiler and prints the time
in their convolutions against their whole step (thread-ms); `benchmarks/cpu_profile.py`
gives ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_TORCH_PYTHON = "/tmp/torchvenv/bin/python"


# --------------------------------------------------------------------------- torch side
def torch_worker(args) -> int:
  """Builds imagen-pytorch's Unet, then answers 'run N' lines with seconds per step."""
  import importlib.machinery
  import importlib.util
  import types
  import torch

  def stand_in(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module

  # Only the U-Net module is needed. Its package __init__ imports the trainer (accelerate,
  # datasets, transformers) and its T5 wrapper imports transformers, neither of which the
  # U-Net uses; torchvision is imported for image conversions we never call, and the PyPI
  # torchvision wheel next to torch+cpu fails to load its C ops. So: the package without
  # its __init__, a T5 stand-in giving the default text width, and a torchvision stand-in
  # when the real one does not load.
  spec = importlib.util.find_spec("imagen_pytorch")
  if spec is None:
    raise SystemExit(f"imagen-pytorch is not installed for {sys.executable}")
  stand_in("imagen_pytorch", __path__=list(spec.submodule_search_locations))
  stand_in("imagen_pytorch.t5", DEFAULT_T5_NAME="google/t5-v1_1-base",
           get_encoded_dim=lambda name: 768, t5_encode_text=None)
  try:
    import torchvision.transforms  # noqa: F401
  except Exception:  # noqa: BLE001
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    stand_in("torchvision").transforms = stand_in("torchvision.transforms")
  from imagen_pytorch.imagen_pytorch import Unet

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  shape = json.loads(args.shape)
  levels = len(shape["channel_mult"])
  attn = tuple(shape["image_size"] // 2 ** i in shape["attention_resolutions"]
               for i in range(levels))
  widest = shape["model_channels"] * max(shape["channel_mult"])
  unet = Unet(dim=shape["model_channels"], dim_mults=tuple(shape["channel_mult"]),
              num_resnet_blocks=shape["num_res_blocks"], layer_attns=attn,
              layer_cross_attns=attn, attn_dim_head=shape["head_dim"],
              attn_heads=max(2, widest // shape["head_dim"]),
              text_embed_dim=shape["text_dim"], channels=3, max_text_len=args.text_length)
  params = list(unet.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=1e-4)
  b, s, l = args.batch, shape["image_size"], args.text_length
  g = torch.Generator().manual_seed(0)
  x0 = torch.rand(b, 3, s, s, generator=g) * 2 - 1
  text = torch.randn(b, l, shape["text_dim"], generator=g)
  mask = torch.arange(l)[None, :] < torch.randint(1, l + 1, (b, 1), generator=g)

  def step():
    t = torch.rand(b)
    noise = torch.randn_like(x0)
    alpha, sigma = torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    pred = unet(x_t, t, text_embeds=text, text_mask=mask, cond_drop_prob=0.1)
    loss = torch.nn.functional.mse_loss(pred, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)

  for _ in range(args.warmup):
    step()
  print("RESULT " + json.dumps({"params": sum(p.numel() for p in params),
                               "torch": torch.__version__}), flush=True)
  for line in sys.stdin:
    command, n = line.split()[0], int(line.split()[1])
    if command == "profile":  # thread-milliseconds per step, convolutions and all
      from torch.profiler import ProfilerActivity, profile
      with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
          step()
      events = prof.key_averages()
      print(events.table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
      ms = lambda evs: sum(e.self_cpu_time_total for e in evs) / n / 1e3
      print("RESULT " + json.dumps({"conv_ms": ms(e for e in events if "convolution" in e.key),
                                    "total_ms": ms(events)}), flush=True)
      continue
    t0 = time.perf_counter()
    for _ in range(n):
      step()
    print("RESULT " + json.dumps({"step_s": (time.perf_counter() - t0) / n}), flush=True)
  return 0


# --------------------------------------------------------------------------- our side
def model_shape(gin_files, bindings) -> dict:
  import gin
  from imagen_jax import config
  import imagen_jax.nn  # noqa: F401
  config.parse_gin(gin_files, bindings, finalize=False)
  cls = gin.query_parameter("create_model.model_cls")
  if "UNet" not in str(cls) or "Efficient" in str(cls):
    raise SystemExit(f"the comparison supports the base UNet only, got {cls}")

  def q(name):
    value = gin.query_parameter(f"UNet.{name}")
    if isinstance(value, gin.config.ConfigurableReference):  # a macro such as %IMAGE_SIZE
      value = gin.query_parameter(value.scoped_selector.replace("gin.macro", "macro")
                                  + ".value")
    return value
  return {"image_size": q("image_size"), "text_dim": q("text_dim"),
          "model_channels": q("model_channels"), "channel_mult": list(q("channel_mult")),
          "num_res_blocks": q("num_res_blocks"),
          "attention_resolutions": list(q("attention_resolutions")),
          "head_dim": q("head_dim")}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=None)
  p.add_argument("--gin_binding", action="append", default=[])
  p.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON,
                 help="interpreter of the venv holding torch and imagen-pytorch")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_length", type=int, default=16)
  p.add_argument("--steps", type=int, default=5, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--profile", action="store_true",
                 help="then profile imagen-pytorch's step by op (its top ops on stderr)")
  p.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--shape", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.torch_worker:
    return torch_worker(args)
  args.gin_file = args.gin_file or ["models/tiny_base.gin"]

  if not os.access(args.torch_python, os.X_OK):
    print(f"no interpreter at --torch_python={args.torch_python}; create the imagen-pytorch "
          "venv first:\n  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install "
          "torch==2.13.0 imagen-pytorch==2.1.0", file=sys.stderr)
    return 2

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import cpu_throughput
  import jax

  shape = model_shape(args.gin_file, args.gin_binding)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  theirs = subprocess.Popen(
      [args.torch_python, os.path.abspath(__file__), "--torch_worker", "--shape",
       json.dumps(shape), "--batch", str(args.batch), "--text_length", str(args.text_length),
       "--warmup", str(args.warmup), "--threads", str(args.threads)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
  def reply() -> dict:
    """The worker's next RESULT line (imagen-pytorch prints advice on stdout too)."""
    for line in theirs.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT "):])
    raise SystemExit(f"the imagen-pytorch worker ({args.torch_python}) stopped; see its "
                     "error above")

  theirs_info = reply()

  step, state, data, our_params, compile_s, _ = cpu_throughput.build_step(
      args.gin_file, args.gin_binding, args.batch, args.text_length)
  for _ in range(args.warmup):
    state, _ = step(state, data)
  jax.block_until_ready(state)

  ours_t, theirs_t = [], []
  for r in range(args.rounds):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, _ = step(state, data)
    jax.block_until_ready(state)
    ours_t.append((time.perf_counter() - t0) / args.steps)
    theirs.stdin.write(f"run {args.steps}\n")
    theirs.stdin.flush()
    theirs_t.append(reply()["step_s"])
    print(f"round {r + 1}/{args.rounds}: ours {args.batch / ours_t[-1]:.1f} ex/s, "
          f"imagen-pytorch {args.batch / theirs_t[-1]:.1f} ex/s", flush=True)
  if args.profile:
    theirs.stdin.write(f"profile {args.steps}\n")
    theirs.stdin.flush()
    prof = reply()
  theirs.stdin.close()
  theirs.wait()

  ours_m, theirs_m = statistics.median(ours_t), statistics.median(theirs_t)
  print(f"shape: {json.dumps(shape)}; batch {args.batch}, text length {args.text_length}")
  print(f"ours (jax {jax.__version__}):           {our_params / 1e6:6.2f}M params, "
        f"{args.batch / ours_m:6.1f} examples/s (compile {compile_s:.0f} s)")
  print(f"imagen-pytorch (torch {theirs_info['torch']}): "
        f"{theirs_info['params'] / 1e6:6.2f}M params, {args.batch / theirs_m:6.1f} examples/s")
  print(f"ratio ours / imagen-pytorch examples/s: {theirs_m / ours_m:.2f}")
  if args.profile:
    print(f"imagen-pytorch profile: convolutions {prof['conv_ms']:.0f} of "
          f"{prof['total_ms']:.0f} thread-ms per step (torch.profiler, self time; ours: "
          "benchmarks/cpu_profile.py)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
