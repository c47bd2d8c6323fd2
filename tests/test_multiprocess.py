"""Real multi-process JAX jobs on one CPU: 2 processes x 2 simulated devices, started by
launch/multiprocess_cpu.sh (or directly), running `python -m imagen_jax.cli.smoke`.

- the job joins, sees 4 global devices, builds global arrays from per-process rows whose
  all-reduced sums are right, takes process 0's decision everywhere (the time limit's
  agreement), and saves and restores an orbax checkpoint both wrote;
- SIGTERM to one process (a preemption): both stop at the same step and save it;
- a killed process: the launcher stops the other at once, with one line naming it;
- without the launcher, JAX's heartbeat ends the survivor within the configured timeout.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from imagen_jax.parallel import ports

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = str(REPO / "launch" / "multiprocess_cpu.sh")
SMOKE = [sys.executable, "-m", "imagen_jax.cli.smoke"]


def records(stdout: str, tag: str) -> dict[int, dict]:
  """{process index: json} of the lines '[i] TAG {json}'."""
  out = {}
  for line in stdout.splitlines():
    m = re.match(rf"\[(\d+)\] {tag} (.*)$", line)
    if m:
      out[int(m.group(1))] = json.loads(m.group(2))
  return out


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(")")[-1].split()[0] != "Z"


def test_two_processes_global_arrays_and_checkpoint(tmp_path):
  result = subprocess.run(
      [LAUNCHER, "2", "--devices_per_process=2", "--timeout=120", "--", *SMOKE,
       f"--workdir={tmp_path}", "--mesh=data:2,fsdp:2"],
      capture_output=True, text=True, timeout=150, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  ok = records(result.stdout, "SMOKE_OK")
  assert sorted(ok) == [0, 1], result.stdout[-3000:]
  n = 2 * 4  # ROWS_PER_DEVICE x global devices
  expected_sum = sum(r * 10 * 3 + 3 for r in range(n))  # rows r*10 + [0, 1, 2]
  for i in (0, 1):
    assert ok[i]["process_index"] == i and ok[i]["process_count"] == 2
    assert ok[i]["local_devices"] == 2 and ok[i]["global_devices"] == 4
    assert ok[i]["method"] == "explicit"
    assert ok[i]["rows"] == [4 * i, 4 * i + 4]  # each process loads its half
    assert ok[i]["sum"] == expected_sum
    assert ok[i]["process0_decides"] is True  # process 1 said no; it heard process 0's yes
  # Both processes wrote their own shards into the one checkpoint.
  step_dir = tmp_path / "checkpoints" / "7"
  written = {p.name for p in step_dir.rglob("ocdbt.process_*")}
  assert written == {"ocdbt.process_0", "ocdbt.process_1"}


def start_loop(tmp_path, steps=600):
  """The launcher running the smoke program's step loop; returns it once both loop."""
  log = open(tmp_path / "out.log", "w")
  launcher = subprocess.Popen(
      [LAUNCHER, "2", "--timeout=150", "--grace=1", "--", *SMOKE,
       f"--workdir={tmp_path}", f"--steps={steps}", "--step_seconds=0.05"],
      stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
  deadline = time.monotonic() + 120
  pids = {}
  while len(pids) < 2:
    assert launcher.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
    assert time.monotonic() < deadline, "the processes never started their loops"
    for m in re.finditer(r"\[(\d)\] LOOP_STARTED pid=(\d+)", (tmp_path / "out.log").read_text()):
      pids[int(m.group(1))] = int(m.group(2))
    time.sleep(0.2)
  time.sleep(0.5)  # a few steps
  return launcher, pids


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  launcher, pids = start_loop(tmp_path)
  os.kill(pids[1], signal.SIGTERM)
  assert launcher.wait(timeout=60) == 0, (tmp_path / "out.log").read_text()[-3000:]
  done = records((tmp_path / "out.log").read_text(), "PREEMPTED")
  steps = {done[i]["preempted_at"] for i in (0, 1)}
  assert len(steps) == 1 and None not in steps, done
  (step,) = steps
  assert (tmp_path / "checkpoints" / str(step)).is_dir()


def test_killed_process_stops_the_job_with_one_clear_line(tmp_path):
  launcher, pids = start_loop(tmp_path)
  killed_at = time.monotonic()
  os.kill(pids[1], signal.SIGKILL)
  rc = launcher.wait(timeout=60)
  elapsed = time.monotonic() - killed_at
  output = (tmp_path / "out.log").read_text()
  assert rc == 128 + signal.SIGKILL, output[-3000:]
  # The grace period, not the 100 s heartbeat timeout or a hang (margin for a loaded machine).
  assert elapsed < 40
  assert output.strip().splitlines()[-1] == (
      f"multiprocess_cpu.sh: process 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL); "
      "stopped the other 1 process(es)")
  assert not alive(pids[0])


def test_without_launcher_jax_heartbeat_ends_the_survivor(tmp_path):
  """No watcher: process 1 raises after joining; JAX itself must end process 0 within the
  heartbeat timeout we configured (instead of waiting forever in a collective)."""
  port = ports.coordinator_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [*SMOKE, f"--workdir={tmp_path}", "--fail_process=1", "--heartbeat_timeout=5",
       f"--coordinator_address=localhost:{port}", "--process_count=2",
       f"--process_index={i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=env, cwd=REPO) for i in range(2)]
  try:
    out1, _ = procs[1].communicate(timeout=120)
    # The exception ends process 1 at once (hosts' hook), not after the shutdown timeout.
    assert procs[1].returncode == 1, out1[-3000:]
    assert "RuntimeError: process 1 failing on purpose" in out1
    failed_at = time.monotonic()
    out0, _ = procs[0].communicate(timeout=60)
    elapsed = time.monotonic() - failed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode != 0
  print("survivor ended", elapsed, "s after the crash")
  # The 5 s heartbeat timeout plus detection, well before the 60 s shutdown timeout.
  assert elapsed < 45, elapsed
  assert "JAX distributed service detected fatal errors" in out0 or \
      "another task died" in out0, out0[-3000:]
