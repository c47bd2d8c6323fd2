"""Research harness: what gives the best ShapesBench score at the quickstart's budget?

NOT a second trainer. It is a small, single-process loop built from the library pieces
(the shapes `Pipeline` + `EmbeddingCache`, `nn.UNet`, the trainer's own loss conditioning
`train.step.noise_and_conditioning`, `diffusion.loss_at`, `train.optim` for Adam, the
learning-rate schedule and the EMA, `diffusion.sample` + `classifier_free_guidance` +
thresholding for sampling, `eval.shapesbench.check_image` for scoring) so that many
short base-stage (16x16) runs can be compared quickly, scored at several step counts and
with several samplers from one training run. No checkpoints, no sharding, no SR stage.
The quickstart itself uses the real CLIs (imagen-embed, imagen-train, imagen-sample,
imagen-eval); its settings come from what this script measured (docs/quickstart.md).

    .venv/bin/python benchmarks/quality_sweep.py --name=base --steps=3000 \
        --eval_at=1000,2000,3000 --samplers=dpmpp_2m:25:static:3,ddpm:250:static:3 \
        --out=runs/sweep
    # one JSON line per (eval step, weights, sampler) appended to runs/sweep/results.jsonl

Does the model know the layout from the caption alone? `--order_probe=-10,-4` ends the run
with `order_probe` (x0-hat at those noise levels vs the caption's mean image and its
swapped-order / other-axis versions); `--train_log_snr=-10` trains at one noise level
only, which turns training into a plain caption -> mean-image regression:

    .venv/bin/python benchmarks/quality_sweep.py --name=probe --text_positions=16 \
        --steps=600 --batch=32 --width=32 --objective=v --train_log_snr=-10 --no_eval \
        --order_probe=-10 --out=runs/sweep

Quality is reported against training steps (and examples seen), throughput (steps/s)
separately, because the machine is shared: wall time depends on the load.
Text assets and the embedding cache are built on first use in --work (a random T5 from
`imagen_jax.quickstart.text_assets`, both caption splits).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from imagen_jax import diffusion, nn  # noqa: E402
from imagen_jax.data import shapes  # noqa: E402
from imagen_jax.data.pipeline import Pipeline  # noqa: E402
from imagen_jax.eval import shapesbench  # noqa: E402
from imagen_jax.nn.unet import UNet  # noqa: E402
from imagen_jax.quickstart import text_assets  # noqa: E402
from imagen_jax.text import cache as cache_lib  # noqa: E402
from imagen_jax.train import optim  # noqa: E402
from imagen_jax.train import step as step_lib  # noqa: E402


def ensure_text(work: str, *, d_model: int, num_layers: int, num_heads: int,
                max_length: int, t5_dir: str = "") -> str:
  """A random T5 of the given size (or the T5 in `t5_dir`) and a cache of every shapes
  caption; -> cache dir. Runs started side by side share --work: one builds while the
  others wait on a lock, so that none reads a half-written cache."""
  os.makedirs(work, exist_ok=True)
  with open(os.path.join(work, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _build_text(work, d_model, num_layers, num_heads, max_length, t5_dir)


def _build_text(work, d_model, num_layers, num_heads, max_length, t5_dir) -> str:
  from imagen_jax.text.encode import TextEncoder
  if not t5_dir:
    t5_dir = os.path.join(work, f"t5_d{d_model}_l{num_layers}_h{num_heads}")
  weights = os.path.join(t5_dir, "model.safetensors")
  if not os.path.exists(weights):  # --t5 names a random T5 (no grounding)
    text_assets.make_toy_text_assets(t5_dir, d_model=d_model, num_layers=num_layers,
                             num_heads=num_heads, grounding_steps=0)
  # Keyed by the weights too: two T5 directories of one name (e.g. runs' "t5") must not
  # share a cache.
  with open(weights, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  tag = f"t5_{os.path.basename(os.path.normpath(t5_dir))}_{digest}"
  cache_dir = os.path.join(work, f"cache_{tag}_L{max_length}")
  if not os.path.exists(os.path.join(cache_dir, "manifest.json")):
    enc = TextEncoder.load(t5_dir, max_length=max_length, batch_size=128)
    captions = shapes.all_captions("train") + shapes.all_captions("held_out")
    cache_lib.build_cache(cache_dir, captions, enc)
  return cache_dir


def eval_prompts(n: int, seed: int = 1234) -> list[str]:
  """n training-split prompts (40% one object, 60% two) + 1/4 as many held-out ones."""
  rng = np.random.default_rng(seed)
  one = [c for c in shapes.all_captions("train") if " of " not in c and len(c.split()) == 3]
  two = [c for c in shapes.all_captions("train") if c not in one]
  n_one = round(0.4 * n)
  out = list(rng.choice(one, n_one, replace=n_one > len(one)))
  out += list(rng.choice(two, n - n_one, replace=False))
  out += list(rng.choice(shapes.all_captions("held_out"), max(1, n // 4), replace=False))
  return [str(c) for c in out]


def score(images: np.ndarray, prompts: list[str]) -> dict:
  rows = {"train": [], "held_out": []}
  for img, p in zip(images, prompts):
    r = shapesbench.check_image(img, p)
    rows["held_out" if shapes.is_held_out(p) else "train"].append(r)
  return {split: shapesbench.accuracies(rs) for split, rs in rows.items() if rs}


def parse_sampler(spec: str) -> dict:
  method, steps, thr, scale = spec.split(":")
  return {"method": method, "num_steps": int(steps), "thresholding": thr,
          "guidance_scale": float(scale)}


def make_sampler(graphdef, rest, cfg: dict, objective: str, size: int):
  grid = np.asarray(diffusion.log_snr_grid(diffusion.cosine_log_snr, cfg["num_steps"]))
  log_snrs = jnp.asarray(np.concatenate([grid[:-1], [np.inf]]), jnp.float32)
  thr = {"static": diffusion.static_threshold, "none": None,
         "dynamic": diffusion.dynamic_threshold}[cfg["thresholding"]]
  stochastic = cfg["method"] == "ddpm"

  @jax.jit
  def run(params, seeds, text_emb, text_mask):
    model = nnx.merge(graphdef, params, rest)
    fn = lambda x, l, **c: model(x, l, c["text_emb"], c["text_mask"])
    guided = diffusion.classifier_free_guidance(fn, cfg["guidance_scale"])
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 2))(seeds)
    x = jax.vmap(lambda k: jax.random.normal(k, (size, size, 3)))(keys[:, 0])
    x = diffusion.sample(lambda x, l: guided(x, l, text_emb=text_emb, text_mask=text_mask),
                         x, log_snrs, method=cfg["method"],
                         rng=keys[:, 1] if stochastic else None, objective=objective,
                         x0_transform=thr)
    return jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5).astype(jnp.uint8)
  return run


def order_probe(graphdef, rest, params, cache, max_length: int, objective: str,
                log_snrs: list[float], n_captions: int = 48, n_noise: int = 16) -> dict:
  """Does the model know the layout from the caption alone?

  At a high noise level x_t carries (almost) no trace of the image, so the best x0
  prediction is the caption's mean image E[x0 | caption], which puts each object's colour
  where the caption places it. For n_captions two-object training captions, the model's
  x0-hat (unguided, averaged over n_noise pure-noise inputs) is compared with the mean of
  32 renders of the caption and of (order) the caption with its two objects swapped,
  (axis) the caption with the relation on the other axis. Returns, per log-SNR, the
  fraction of captions whose x0-hat is closer to their own mean: 1.0 for a model that
  knows, 0.5 for a coin flip.
  """
  rng = np.random.default_rng(0)
  two = [c for c in shapes.all_captions("train") if shapes.parse_caption(c).relation]
  captions = [str(c) for c in rng.choice(two, n_captions, replace=False)]
  emb, mask = cache.get_batch(captions, max_length)
  emb, mask = jnp.asarray(np.asarray(emb, np.float32)), jnp.asarray(mask)
  own = np.stack([shapes.mean_render(c, 16) for c in captions])
  others = {name: np.stack([shapes.mean_render(fn(c), 16) for c in captions])
            for name, fn in (("order", shapes.swap_objects), ("axis", shapes.other_axis))}

  @jax.jit
  def x0_hat(lam, key):
    model = nnx.merge(graphdef, params, rest)
    log_snr = jnp.full((len(captions),), lam)
    _, sigma = diffusion.alpha_sigma(lam)

    def one(k):
      x_t = sigma * jax.random.normal(k, (len(captions), 16, 16, 3))
      return diffusion.to_x0(model(x_t, log_snr, emb, mask), x_t, log_snr, objective)
    return jax.lax.map(one, jax.random.split(key, n_noise)).mean(0)

  out = {}
  for lam in log_snrs:
    pred = np.asarray(x0_hat(jnp.float32(lam), jax.random.key(1)))
    d_own = np.linalg.norm((pred - own).reshape(len(captions), -1), axis=1)
    out[str(lam)] = {name: float(np.mean(
        d_own < np.linalg.norm((pred - other).reshape(len(captions), -1), axis=1)))
        for name, other in others.items()}
  return out


class RoleOracleCache:
  """An embedding cache whose two-object captions carry their layout in the text: each
  object's colour and shape tokens get +u when the caption puts that object on the left or
  top, -u otherwise (u: a fixed random vector, `scale` times the embeddings' RMS norm).
  What a text encoder that understood the relation would hand the U-Net; a probe of
  whether the U-Net can use it. Tokens: "a {c1} {s1} ... a {c2} {s2}</s>", one piece per
  word (the toy tokenizer), so the objects are tokens 1-2 and the two before EOS.
  """

  def __init__(self, cache, scale: float):
    self.cache, self.scale, self.u = cache, scale, None

  def get_batch(self, captions, max_length):
    emb, mask = self.cache.get_batch(captions, max_length)
    emb, mask = np.array(emb, np.float32), np.asarray(mask, bool)
    if self.u is None:
      u = np.random.default_rng(123).normal(size=emb.shape[-1]).astype(np.float32)
      rms = np.sqrt(np.mean(np.square(emb[mask])) * emb.shape[-1])
      self.u = self.scale * rms * u / np.linalg.norm(u)
    for row, caption in enumerate(captions):
      parsed = shapes.parse_caption(str(caption))
      if parsed.relation is None:
        continue
      sign = 1.0 if parsed.relation in ("to the left of", "above") else -1.0
      n = int(mask[row].sum())
      emb[row, 1:3] += sign * self.u
      emb[row, n - 3:n - 1] -= sign * self.u
    return emb, mask


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True)
  p.add_argument("--out", default="runs/sweep")
  p.add_argument("--work", default="runs/sweep/text")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--eval_at", default="")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--b2", type=float, default=0.999, help="Adam's second-moment decay")
  p.add_argument("--clip_norm", type=float, default=1.0)
  p.add_argument("--decay_steps", type=int, default=0, help="cosine decay after warm-up")
  p.add_argument("--end_lr_fraction", type=float, default=0.0,
                 help="the decay ends at --lr times this (lr_schedule.end_lr_fraction)")
  p.add_argument("--ema", type=float, default=0.999)
  p.add_argument("--objective", default="eps")
  p.add_argument("--weighting", default="none")
  p.add_argument("--min_snr_gamma", type=float, default=5.0)
  p.add_argument("--cond_drop", type=float, default=0.1)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--mult", default="1,2,2")
  p.add_argument("--blocks", type=int, default=2)
  p.add_argument("--attn", default="8,4")
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--t5", default="64,2,4", help="d_model,layers,heads of the random T5")
  p.add_argument("--text_positions", type=int, default=0,
                 help="UNet.text_positions: learned text position embeddings (0: none)")
  p.add_argument("--text_layers", type=int, default=0,
                 help="UNet.text_layers: trainable transformer layers over the text")
  p.add_argument("--coord_channels", action="store_true",
                 help="UNet.coord_channels: (y, x) coordinate input channels")
  p.add_argument("--t5_dir", default="", help="use this T5 directory instead of --t5")
  p.add_argument("--max_length", type=int, default=16)
  p.add_argument("--samplers", default="dpmpp_2m:25:static:3")
  p.add_argument("--n_eval", type=int, default=80)
  p.add_argument("--eval_batch", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_raw", action="store_true",
                 help="also sample with the trained weights themselves, not only the EMA")
  p.add_argument("--no_eval", action="store_true", help="throughput only")
  p.add_argument("--train_shift", type=float, default=0.0,
                 help="add this to the log-SNR of every training noise level (a shifted "
                 "cosine schedule, Hoogeboom et al. 2023; the samplers' grid is unchanged)")
  p.add_argument("--train_log_snr", type=float, default=None,
                 help="train at this one noise level only (a probe; no caption dropout)")
  p.add_argument("--oracle_roles", type=float, default=0.0,
                 help="add each object's layout role to its text tokens at this scale "
                 "(RoleOracleCache; 0: the real embeddings)")
  p.add_argument("--order_probe", default="",
                 help="log-SNRs (e.g. -10,-4) at which to run order_probe after training")
  p.add_argument("--load_ema", default="", help="an .npz of EMA weights saved by a run "
                 "with the same model flags: skip training, only sample and score")
  args = p.parse_args(argv)

  d_model, layers_, heads = (int(v) for v in args.t5.split(","))
  cache_dir = ensure_text(args.work, d_model=d_model, num_layers=layers_, num_heads=heads,
                          max_length=args.max_length, t5_dir=args.t5_dir)
  cache = cache_lib.EmbeddingCache.open(cache_dir)
  if args.oracle_roles:
    cache = RoleOracleCache(cache, args.oracle_roles)
  pipe = Pipeline("shapes", cache, image_size=16, global_batch_size=args.batch,
                  seed=args.seed, max_length=args.max_length)

  model = UNet(image_size=16, text_dim=d_model, model_channels=args.width,
               channel_mult=tuple(int(v) for v in args.mult.split(",")),
               num_res_blocks=args.blocks,
               attention_resolutions=tuple(int(v) for v in args.attn.split(",") if v),
               head_dim=args.head_dim, num_groups=args.groups,
               text_positions=args.text_positions, text_layers=args.text_layers,
               coord_channels=args.coord_channels, rngs=nnx.Rngs(args.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = nn.param_count(params)
  sched = lambda s: optim.lr_schedule(s, peak_lr=args.lr, warmup_steps=args.warmup,
                                      decay_steps=args.decay_steps or None,
                                      end_lr_fraction=args.end_lr_fraction)
  tx, _ = optim.make_optimizer("adam", learning_rate=sched, clip_norm=args.clip_norm,
                               b2=args.b2)
  opt_state = tx.init(params)
  ema = jax.tree.map(jnp.copy, params)
  loss_cfg = step_lib.LossConfig(objective=args.objective, weighting=args.weighting,
                                 min_snr_gamma=args.min_snr_gamma,
                                 cond_drop_prob=args.cond_drop)

  @jax.jit
  def train_step(params, opt_state, ema, batch, step):
    rng = jax.random.fold_in(jax.random.key(args.seed), step)
    keys = step_lib.example_keys(rng, jnp.arange(args.batch))
    x0, log_snr, noise, cond = step_lib.noise_and_conditioning(
        batch, keys, loss_cfg, fixed_log_snr=args.train_log_snr)
    log_snr = log_snr + args.train_shift

    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      fn = lambda x, l, **c: m(x, l, c["text_emb"], c["text_mask"], train=True)
      return diffusion.loss_at(fn, x0, log_snr, noise, objective=args.objective,
                               weighting=args.weighting, min_snr_gamma=args.min_snr_gamma,
                               **cond).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = optim.ema_update(ema, params, optim.ema_decay(step, decay=args.ema))
    return params, opt_state, ema, loss

  prompts = eval_prompts(args.n_eval)
  emb, mask = cache.get_batch(prompts, args.max_length)
  emb = np.asarray(emb, np.float32)
  samplers = [parse_sampler(s) for s in args.samplers.split(",")]
  eval_steps = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.steps})
  runners = {}

  os.makedirs(args.out, exist_ok=True)
  results = open(os.path.join(args.out, "results.jsonl"), "a")
  config = {k: v for k, v in vars(args).items() if k not in ("out", "work", "eval_at")}
  print(f"[{args.name}] {n_params / 1e6:.2f}M params", flush=True)
  leaves, treedef = jax.tree.flatten(ema)
  if args.load_ema:
    with np.load(args.load_ema) as f:
      ema = jax.tree.unflatten(treedef, [jnp.asarray(f[f"p{i}"]) for i in range(len(leaves))])
    args.steps, eval_steps = 1, [1]
  losses, t0, train_time, train_cpu = [], time.time(), 0.0, 0.0
  batches = pipe.iter_batches(0)
  for step in range(args.steps):
    batch = next(batches)
    batch = {k: batch[k] for k in ("image", "text_emb", "text_mask")}
    ts, cs = time.time(), time.process_time()
    if args.load_ema:
      loss = jnp.zeros(())
    else:
      params, opt_state, ema, loss = train_step(params, opt_state, ema, batch, step)
    if step % 50 == 0 or step + 1 in eval_steps:
      losses.append(float(loss))
    if step >= 3:  # the first steps compile
      jax.block_until_ready(params)
      train_time += time.time() - ts
      train_cpu += time.process_time() - cs
    if step % 250 == 0:
      rate = f" {(step - 2) / train_time:.2f} steps/s" if train_time else ""
      print(f"[{args.name}] step {step} loss {float(loss):.4f}{rate}", flush=True)
    if step + 1 in eval_steps and not args.no_eval:
      for which, weights in (("ema", ema),) + ((("raw", params),) if args.eval_raw else ()):
        for cfg in samplers:
          key = tuple(sorted(cfg.items()))
          if key not in runners:
            runners[key] = make_sampler(graphdef, rest, cfg, args.objective, 16)
          ts = time.time()
          images = []
          for i in range(0, len(prompts), args.eval_batch):
            sl = slice(i, i + args.eval_batch)
            seeds = np.arange(len(prompts), dtype=np.uint32)[sl]
            images.append(np.asarray(runners[key](weights, seeds, emb[sl], mask[sl])))
          images = np.concatenate(images)
          sample_s = time.time() - ts
          res = score(images, prompts)
          row = {"name": args.name, "step": step + 1, "examples": (step + 1) * args.batch,
                 "weights": which, "sampler": cfg, "scores": res,
                 "loss": float(np.mean(losses[-5:])), "params_m": n_params / 1e6,
                 "train_s": train_time, "steps_per_s": (step - 2) / max(train_time, 1e-9),
                 # CPU seconds per step (all threads): less dependent on the load than wall
                 "cpu_s_per_step": train_cpu / max(step - 2, 1),
                 "sample_s": sample_s, "load": os.getloadavg()[0], "config": config}
          results.write(json.dumps(row) + "\n")
          results.flush()
          tr = res["train"]
          ho = res.get("held_out", {})
          print(f"[{args.name}] step {step + 1} {which} {cfg['method']}:{cfg['num_steps']}:"
                f"{cfg['thresholding']}:{cfg['guidance_scale']} train colour "
                f"{tr['color']:.2f} rel {tr['relation']:.2f} shape {tr['shape']:.2f} "
                f"overall {tr['overall']:.2f} {tr['relation_outcomes']} | "
                f"held-out colour {ho.get('color', 0):.2f} "
                f"rel {ho.get('relation') or 0:.2f} | sample {sample_s:.0f}s", flush=True)
      if step + 1 == eval_steps[-1] and not args.no_eval:
        np.save(os.path.join(args.out, f"{args.name}_samples.npy"), images)
  if args.order_probe:
    probe = order_probe(graphdef, rest, ema, cache, args.max_length, args.objective,
                        [float(v) for v in args.order_probe.split(",")])
    results.write(json.dumps({"name": args.name, "step": args.steps, "order_probe": probe,
                              "config": config}) + "\n")
    results.flush()
    for lam, fractions in probe.items():
      print(f"[{args.name}] order probe at log-SNR {lam}: x0-hat has the caption's order "
            f"in {fractions['order']:.0%}, its axis in {fractions['axis']:.0%} of 48 "
            "captions (0.5 = chance)", flush=True)
  if not args.load_ema:
    np.savez(os.path.join(args.out, f"{args.name}_ema.npz"),
             **{f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(ema))})
  print(f"[{args.name}] done: {(args.steps - 3) / max(train_time, 1e-9):.2f} steps/s, "
        f"{train_cpu / max(args.steps - 3, 1):.2f} CPU s/step of training "
        f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
  sys.exit(main())
