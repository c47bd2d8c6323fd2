"""Where the CPU train step's time goes: a per-op profile of the jitted step.

  python benchmarks/cpu_profile.py --gin_file=experiments/quickstart_base.gin [--steps=5] \
      [--batch=32] [--text_length=16] [--top=25]

It builds the step as `cpu_throughput.py` does (Adam, synthetic batches, one device), runs
it under `jax.profiler`, reads the trace's XPlane (the protobuf that TensorBoard's profiler
reads; here through TensorFlow's copy of the proto) and sums the time of every XLA:CPU
thunk over all threads, grouped by the JAX operation that produced it (the HLO's
`op_name`): forward convolutions, their transposes (backward), elementwise fusions,
layout copies. The figures are thread-milliseconds per step: with 2 threads they add up
to about twice the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def thunk_times(trace_dir: str) -> collections.Counter:
  """{thunk name: picoseconds} summed over the XLA:CPU worker threads of the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  out = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
        continue
      for event in line.events:
        name = names.get(event.metadata_id, "?")
        if "ThunkExecutor" not in name:
          out[name] += event.duration_ps
  return out


def op_names(hlo_text: str) -> dict:
  """{HLO instruction name: its op_name metadata, without the jit prefix}."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = re.sub(r"^jit\([^)]*\)/", "", op.group(1)) if op else ""
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=None)
  p.add_argument("--binding", action="append", default=[], help="gin binding")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_length", type=int, default=16)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  import jax
  import cpu_throughput
  gin_files = args.gin_file or ["experiments/quickstart_base.gin"]
  step, state, data, _, compile_s, _ = cpu_throughput.build_step(
      gin_files, args.binding, args.batch, args.text_length)
  for _ in range(3):
    state, _ = step(state, data)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, _ = step(state, data)
  jax.block_until_ready(state)
  wall_ms = (time.perf_counter() - t) / args.steps * 1e3
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      state, _ = step(state, data)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    times = thunk_times(trace_dir)
  ops = op_names(step.as_text())
  groups = collections.Counter()
  for name, ps in times.items():
    kind = re.sub(r"\.\d+$", "", name)
    kind = kind if kind in ("ynn_fusion", "transpose_copy_fusion", "copy", "dot") else "fusion"
    groups[(kind, ops.get(name, "")[-70:])] += ps
  total = sum(times.values()) / args.steps / 1e9
  print(f"{' '.join(gin_files)}  batch {args.batch}: compile {compile_s:.1f} s, "
        f"step {wall_ms:.1f} ms wall, {total:.1f} thread-ms profiled")
  print(f"{'thread-ms':>10s} {'share':>6s}  {'thunk kind':22s} JAX operation")
  for (kind, op), ps in groups.most_common(args.top):
    ms = ps / args.steps / 1e9
    print(f"{ms:10.1f} {ms / total:6.1%}  {kind:22s} {op}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
