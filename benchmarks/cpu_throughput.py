"""A/B throughput of the jitted train step on CPU: interleaved repeats, medians, ratios.

On a shared machine a single timing says little, so variants are compared in the same
run: each round times every variant once (in turn), and the report gives each variant's
median step time and its ratio to the first variant.

  # model variants (gin bindings), compiled side by side in one process:
  python benchmarks/cpu_throughput.py --gin_file=models/tiny_base.gin --batch=32 \
      --variant "base=" --variant "no_attn=UNet.attention_resolutions=()"

  # XLA flag variants (one process per variant and round; XLA_FLAGS is read at start-up):
  python benchmarks/cpu_throughput.py --gin_file=models/tiny_base.gin \
      --env_variant "default=" \
      --env_variant "one_thread=XLA_FLAGS=--xla_cpu_multi_thread_eigen=false"

A variant is `name=binding;binding;...` (gin bindings) or, with --env_variant,
`name=VAR=value;VAR=value` (environment). The step is `train.step.make_train_step` with
Adam (the optimizer gin's default) on synthetic batches (random uint8 images, random text
embeddings, random caption lengths), without the input pipeline. With several devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) the step is data parallel over them,
as in imagen-train: the batch is split, the state replicated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def parse_variant(text: str) -> tuple[str, list[str]]:
  name, _, rest = text.partition("=")
  if not name:
    raise SystemExit(f"bad variant {text!r}: use name=binding;binding (or 'name=')")
  return name, [b.strip() for b in rest.split(";") if b.strip()]


def synthetic_batch(batch: int, size: int, text_length: int, text_dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "text_emb": rng.standard_normal((batch, text_length, text_dim), np.float32),
          "text_mask": np.arange(text_length)[None, :] < rng.integers(
              1, text_length + 1, (batch, 1))}


def build_step(gin_files: list[str], bindings: list[str], batch: int, text_length: int):
  """-> (jitted step, state, device batch, num_params, compile seconds, FLOPs per step)."""
  import gin
  import jax
  from imagen_jax import config
  import imagen_jax.nn as nn
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.train import optim, state as state_lib, step as step_lib
  from imagen_jax.train import metrics as metrics_lib

  gin.clear_config()
  config.parse_gin(gin_files, bindings, finalize=False)
  model = nn.init_model(0)
  graphdef, params, rest = state_lib.split_model(model)
  tx, lr = optim.make_optimizer(learning_rate=1e-4)
  # Data parallel over every device (several with --xla_force_host_platform_device_count):
  # the batch split over them, the state replicated. One device: a plain jit.
  mesh = mesh_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  state = jax.jit(lambda p: state_lib.init_train_state(p, tx, 0),
                  out_shardings=replicated)(params)
  flat_grad_mesh = step_lib.flat_grad_mesh_for(mesh, replicated)

  def jitted(for_flop_count=False):
    step = step_lib.make_train_step(graphdef, rest, tx, loss_cfg=step_lib.LossConfig(),
                                    lr_fn=lr, flat_grad_mesh=flat_grad_mesh,
                                    for_flop_count=for_flop_count)
    return jax.jit(lambda s, b: step(s, b, step_lib.step_key(s.rng, s.step)),
                   donate_argnums=(0,))
  data = jax.device_put(synthetic_batch(batch, int(model.image_size), text_length,
                                        int(model.text_dim)),
                        mesh_lib.batch_sharding(mesh, 1))
  t0 = time.perf_counter()
  lowered = jitted().lower(state, data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # The whole batch's FLOPs, as train.loop counts them (docs/train.md, "Benchmark").
  flops = metrics_lib.cost_flops(lowered if flat_grad_mesh is None
                                 else jitted(for_flop_count=True).lower(state, data))
  return compiled, state, data, nn.param_count(params), compile_s, flops


def worker(args) -> int:
  """Builds every gin variant, then times them round-robin; prints one JSON line."""
  import jax
  variants = [parse_variant(v) for v in (args.variant or ["base="])]
  built = {}
  for name, bindings in variants:
    built[name] = list(build_step(args.gin_file, bindings, args.batch, args.text_length))
  times = {name: [] for name, _ in variants}
  for name, b in built.items():  # warm-up
    for _ in range(args.warmup):
      b[1], m = b[0](b[1], b[2])
    jax.block_until_ready(b[1])
  for _ in range(args.rounds):
    for name, b in built.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        b[1], m = b[0](b[1], b[2])
      jax.block_until_ready(b[1])
      times[name].append((time.perf_counter() - t) / args.steps)
  out = {name: {"step_s": times[name], "params": built[name][3],
                "compile_s": built[name][4], "flops": built[name][5]}
         for name, _ in variants}
  print("RESULT " + json.dumps(out), flush=True)
  return 0


def report(rows: dict, batch: int, peak: float | None) -> None:
  base = None
  print(f"{'variant':24s} {'median step':>12s} {'steps/s':>8s} {'ex/s':>8s} "
        f"{'compile':>8s} {'params':>8s} {'ratio':>6s}" + ("   MFU" if peak else "")
        + "   per-round ms")
  for name, r in rows.items():
    med = statistics.median(r["step_s"])
    base = base or med
    line = (f"{name:24s} {med * 1e3:10.1f}ms {1 / med:8.2f} {batch / med:8.1f} "
            f"{statistics.median(r['compile_s']):7.1f}s {r['params'] / 1e6:7.2f}M "
            f"{base / med:6.2f}")
    if peak and r.get("flops"):
      line += f"  {r['flops'] / med / peak:5.1%}"
    line += "   " + " ".join(f"{t * 1e3:.0f}" for t in r["step_s"])
    print(line)


def driver(args) -> int:
  base_cmd = [sys.executable, os.path.abspath(__file__), "--worker",
              "--batch", str(args.batch), "--text_length", str(args.text_length),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
  for f in args.gin_file:
    base_cmd += ["--gin_file", f]
  env_variants = [parse_variant(v) for v in (args.env_variant or [])]
  rows: dict = {}

  def run(cmd, env, rounds):
    proc = subprocess.run(cmd + ["--rounds", str(rounds)], env=env, capture_output=True,
                          text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f"worker failed (rc {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])

  if not env_variants:
    cmd = base_cmd + sum((["--variant", v] for v in (args.variant or ["base="])), [])
    for name, r in run(cmd, dict(os.environ), args.rounds).items():
      rows[name] = dict(r, compile_s=[r["compile_s"]])
  else:
    for rnd in range(args.rounds):
      for name, assigns in env_variants:
        env = dict(os.environ)
        for a in assigns:
          k, _, v = a.partition("=")
          env[k] = (env.get(k, "") + " " + v).strip() if k == "XLA_FLAGS" else v
        r = run(base_cmd + sum((["--variant", v] for v in (args.variant or ["base="])),
                               []), env, 1)
        for vname, rr in r.items():
          key = name if len(r) == 1 else f"{name}/{vname}"
          row = rows.setdefault(key, {"step_s": [], "compile_s": [], "params": rr["params"],
                                      "flops": rr["flops"]})
          row["step_s"] += [statistics.median(rr["step_s"])]
          row["compile_s"].append(rr["compile_s"])
        print(f"round {rnd + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
  print(f"gin: {' '.join(args.gin_file)}  batch {args.batch}  text_length "
        f"{args.text_length}  rounds {args.rounds} x {args.steps} steps")
  report(rows, args.batch, args.peak_flops)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=None,
                 help="gin file(s), relative to gin_configs/ or absolute")
  p.add_argument("--variant", action="append", help="name=gin_binding;gin_binding")
  p.add_argument("--env_variant", action="append", help="name=VAR=value;VAR=value")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_length", type=int, default=16)
  p.add_argument("--steps", type=int, default=5, help="steps per timed block")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timed blocks")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--peak_flops", type=float, default=None,
                 help="peak FLOP/s for MFU (e.g. measured by benchmarks/train_step.py)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.gin_file = args.gin_file or ["models/tiny_base.gin"]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
  sys.exit(main())
