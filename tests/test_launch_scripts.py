"""launch/multiprocess_cpu.sh and launch/tpu_pod.sh, with small stand-in programs (no JAX):
arguments and environment of every process, output prefixes, stopping every process when
one fails, and the exact (quoted) gcloud commands of a TPU pod run."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imagen_jax.parallel import ports

REPO = pathlib.Path(__file__).resolve().parent.parent
MULTIPROCESS = REPO / "launch" / "multiprocess_cpu.sh"
TPU_POD = REPO / "launch" / "tpu_pod.sh"

# A stand-in for a JAX program: records its pid, arguments and environment, then
# behaves as told by the environment variable BEHAVIOUR_<process index>.
PROGRAM = textwrap.dedent("""\
    import json, os, signal, subprocess, sys, time
    index = int([a for a in sys.argv if a.startswith("--process_index=")][0].split("=")[1])
    out = sys.argv[1]
    behaviour = os.environ.get(f"BEHAVIOUR_{index}", "ok")
    if behaviour == "stubborn":  # like JAX, which catches SIGTERM as a preemption notice
      signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM ignored", flush=True))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(out, f"pids.{index}"), "w") as f:
      f.write(f"{os.getpid()} {child.pid}")
    print(json.dumps({"argv": sys.argv[2:], "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                      "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
                      "cache": os.environ.get("JAX_ENABLE_COMPILATION_CACHE")}), flush=True)
    print("second line", flush=True)
    if behaviour.startswith("exit"):
      time.sleep(0.5)
      sys.exit(int(behaviour[4:]))
    if behaviour in ("stubborn", "sleep"):
      time.sleep(60)
    if behaviour == "log_mid_line":  # a library logs on stderr while a line is half printed
      sys.stdout.write("half"); sys.stdout.flush(); time.sleep(0.2)
      sys.stderr.write("a log line\\n"); sys.stderr.flush(); time.sleep(0.2)
      print(" and the rest", flush=True)
    if behaviour == "native_mid_line":  # a native library (Gloo) prints in pieces on stdout
      import ctypes
      libc = ctypes.CDLL(None)
      libc.printf(b"[Gloo] Rank "); print("a report", flush=True); libc.printf(b"0 is up\\n")
    child.kill()
    """)


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by its parent) counts as gone.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def multiprocess_command(tmp_path, options, behaviour):
  """The launcher's argv and environment for PROGRAM, written to tmp_path."""
  program = tmp_path / "program.py"
  program.write_text(PROGRAM)
  env = {**os.environ, "XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}
  env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
  env.update({f"BEHAVIOUR_{i}": b for i, b in (behaviour or {}).items()})
  return [str(MULTIPROCESS), *options, "--", sys.executable, str(program), str(tmp_path)], env


def run_multiprocess(tmp_path, *options, behaviour=None, timeout=30):
  argv, env = multiprocess_command(tmp_path, options, behaviour)
  start = time.monotonic()
  result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
  return result, time.monotonic() - start


def test_multiprocess_runs_n_copies_with_flags_env_and_prefixes(tmp_path):
  result, _ = run_multiprocess(tmp_path, "3", "--devices_per_process=2", "--port=12399")
  assert result.returncode == 0, result.stderr
  for i in range(3):
    lines = [l for l in result.stdout.splitlines() if l.startswith(f"[{i}] ")]
    assert len(lines) == 2 and lines[1] == f"[{i}] second line", result.stdout
    record = json.loads(lines[0][len(f"[{i}] "):])
    assert record["argv"] == ["--coordinator_address=localhost:12399", "--process_count=3",
                              f"--process_index={i}"]
    # Our device count replaces the inherited one; other XLA flags stay.
    assert record["XLA_FLAGS"].split() == ["--xla_foo=1",
                                           "--xla_force_host_platform_device_count=2"]
    assert record["JAX_PLATFORMS"] == "cpu"
    assert record["cache"] == "false"  # see multiprocess_cpu.sh: keeps processes in step


def test_multiprocess_keeps_stdout_lines_whole_when_stderr_logs(tmp_path):
  result, _ = run_multiprocess(tmp_path, "2", behaviour={0: "log_mid_line"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "[0] half and the rest" in lines and "[0] a log line" in lines, result.stdout


def test_multiprocess_keeps_lines_whole_under_pythonunbuffered(tmp_path, monkeypatch):
  # Unbuffered, Python writes a line and its newline apart and C's stdout goes out piece
  # by piece, so the two would mix within one line.
  monkeypatch.setenv("PYTHONUNBUFFERED", "1")
  result, _ = run_multiprocess(tmp_path, "2", behaviour={0: "native_mid_line"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "[0] a report" in lines and "[0] [Gloo] Rank 0 is up" in lines, result.stdout


def test_multiprocess_stops_all_when_one_fails(tmp_path):
  """Process 1 exits 5; process 0 ignores SIGTERM and has a child: all must be gone."""
  result, elapsed = run_multiprocess(tmp_path, "2", "--grace=1",
                                     behaviour={0: "stubborn", 1: "exit5"})
  assert result.returncode == 5, result.stderr
  # Not the 60 s the survivor would sleep; the margin absorbs a loaded machine.
  assert elapsed < 40
  pid1 = int((tmp_path / "pids.1").read_text().split()[0])
  assert result.stderr.strip().splitlines()[-1] == (
      f"multiprocess_cpu.sh: process 1 (pid {pid1}) exited with status 5; stopped the "
      "other 1 process(es)")
  assert "[0] SIGTERM ignored" in result.stdout
  for pid in map(int, (tmp_path / "pids.0").read_text().split()):  # process 0 and child
    assert not alive(pid)


def test_multiprocess_timeout(tmp_path):
  result, elapsed = run_multiprocess(tmp_path, "2", "--timeout=2", "--grace=1",
                                     behaviour={0: "sleep", 1: "sleep"})
  assert result.returncode == 124
  assert "timed out after 2s; stopped all 2 processes" in result.stderr
  assert elapsed < 40  # not the 60 s the processes would sleep
  for i in range(2):
    assert not alive(int((tmp_path / f"pids.{i}").read_text().split()[0]))


def signal_multiprocess(tmp_path, behaviour, signals):
  """Starts 2 processes, sends the launcher SIGTERM `signals` times, 1 s apart."""
  argv, env = multiprocess_command(tmp_path, ["2"], {0: behaviour, 1: behaviour})
  launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
  for i in range(2):  # both started
    while not (tmp_path / f"pids.{i}").exists():
      time.sleep(0.1)
  for n in range(signals):
    time.sleep(n)
    launcher.send_signal(signal.SIGTERM)
  stdout, stderr = launcher.communicate(timeout=30)
  for i in range(2):
    assert not alive(int((tmp_path / f"pids.{i}").read_text().split()[0]))
  return launcher.returncode, stdout.splitlines(), stderr.splitlines()


def test_multiprocess_forwards_a_signal_and_reports_how_the_processes_ended(tmp_path):
  # The trapped signal interrupts `wait -n`, which then names no process: the launcher
  # must keep waiting for them, not fail.
  rc, _, stderr = signal_multiprocess(tmp_path, "sleep", signals=1)
  assert rc == 128 + signal.SIGTERM
  assert stderr[0] == "multiprocess_cpu.sh: TERM received: forwarding it to all 2 processes"
  assert len(stderr) == 2 and stderr[1].startswith("multiprocess_cpu.sh: process ")
  assert stderr[1].endswith(" was killed by signal 15 (SIGTERM); stopped the other 1 "
                            "process(es)"), stderr


def test_multiprocess_second_signal_kills_all_with_one_line(tmp_path):
  rc, stdout, stderr = signal_multiprocess(tmp_path, "stubborn", signals=2)
  assert rc == 130
  assert stderr == ["multiprocess_cpu.sh: TERM received: forwarding it to all 2 processes",
                    "multiprocess_cpu.sh: second TERM: killed all 2 processes"], stderr
  assert "[0] SIGTERM ignored" in stdout


@pytest.mark.parametrize("argv, message", [
    (["0", "--", "true"], "N must be a positive integer"),
    (["2", "true"], "unknown option 'true'"),
    (["2", "--"], "no COMMAND"),
    (["2", "--devices_per_process=x", "--", "true"], "--devices_per_process"),
    (["2", "--", "no-such-command-xyz"], "command not found"),
])
def test_multiprocess_usage_errors(argv, message):
  result = subprocess.run([str(MULTIPROCESS), *argv], capture_output=True, text=True,
                          timeout=30)
  assert result.returncode == 2 and message in result.stderr


# ---------------------------------------------------------------- tpu_pod.sh

USER_COMMAND = ["imagen-train", "--gin_file=experiments/base 64.gin",
                "--gin.MODEL_DIR='gs://bucket/run 1'",
                "--gin_bindings=UNet.dropout = 0.1", 'say "hi" $HOME; `x`']


def dry_run(*options):
  result = subprocess.run([str(TPU_POD), "my-tpu", "us-central2-b", *options, "--dry_run",
                           "--", *USER_COMMAND], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_tpu_pod_dry_run_commands():
  commands = dry_run("--project", "my-proj", "--num_workers=2", "--sync_dir=code dir")
  tar, scp, setup, *runs = commands
  assert tar[:2] == ["tar", "-czf"] and "--exclude=./.venv" in tar and tar[-1] == "."
  tarball = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "my-tpu:/tmp/imagen-jax-code.tar.gz"]
  for argv in (scp, setup, *runs):
    assert option(argv, "zone") == "us-central2-b" and option(argv, "project") == "my-proj"
  assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert option(setup, "worker") == "all"
  assert "pip install --quiet -e ." in option(setup, "command")
  assert "mkdir -p 'code dir'" in option(setup, "command")
  assert len(runs) == 2
  for i, argv in enumerate(runs):
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert option(argv, "worker") == str(i)


def test_tpu_pod_remote_command_keeps_every_argument_intact(tmp_path):
  """Runs the printed remote command in bash, as a worker's login shell would."""
  runs = dry_run("--num_workers=1", "--skip_sync", "--sync_dir=code dir")
  assert len(runs) == 1  # --skip_sync: no tar, scp or setup
  remote = option(runs[0], "command")
  venv = tmp_path / "code dir" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text(f'PATH="{venv}:$PATH"\n')
  (venv / "imagen-train").write_text(
      "#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
  (venv / "imagen-train").chmod(0o755)
  result = subprocess.run(["bash", "-c", remote], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == USER_COMMAND[1:]
  assert not (tmp_path / "code dir" / ".run.pgid").exists()  # cleaned up after the run


def test_tpu_pod_dry_run_needs_worker_count():
  result = subprocess.run([str(TPU_POD), "t", "z", "--dry_run", "--", "true"],
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "--num_workers" in result.stderr


FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stands in for `gcloud compute tpus tpu-vm ...`: worker i is the directory
    # $FAKE_POD/worker_i, and ssh runs the command there in a new session, as sshd does.
    echo "$*" >> "$FAKE_POD/gcloud.log"
    [ "$4" = describe ] && { echo "10.0.0.1;10.0.0.2"; exit 0; }
    worker=""; command=""
    for a in "$@"; do
      case "$a" in --worker=*) worker="${a#*=}" ;; --command=*) command="${a#*=}" ;; esac
    done
    if [ "$worker" = all ]; then
      for d in "$FAKE_POD"/worker_*; do (cd "$d" && setsid bash -c "$command"); done
    else
      cd "$FAKE_POD/worker_$worker" && exec setsid bash -c "$command"
    fi
    """)


def test_tpu_pod_worker_failure(tmp_path):
  pod = tmp_path / "pod"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  program = tmp_path / "program.py"
  program.write_text(PROGRAM)
  for i in range(2):
    venv = pod / f"worker_{i}" / "imagen-jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    # Each worker's environment says who it is and how it behaves.
    (venv / "activate").write_text(
        f"export BEHAVIOUR_{i}={'stubborn' if i == 0 else 'exit4'}\n")
  wrapper = tmp_path / "worker_program.sh"
  wrapper.write_text(f'#!/usr/bin/env bash\ni="$(basename "$(dirname "$PWD")")"; '
                     f'exec {sys.executable} {program} "$@" --process_index="${{i#worker_}}"\n')
  wrapper.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_POD": str(pod)}
  start = time.monotonic()
  result = subprocess.run(
      [str(TPU_POD), "my-tpu", "zone-a", "--skip_sync", "--grace=1",
       f"--log_dir={tmp_path / 'logs'}", "--", str(wrapper), str(tmp_path)],
      capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
  elapsed = time.monotonic() - start
  assert result.returncode == 4, (result.stdout, result.stderr)
  assert elapsed < 30
  assert result.stderr.strip().splitlines()[-1] == (
      f"tpu_pod.sh: worker 1 exited with status 4 (see {tmp_path / 'logs'}/worker_1.log); "
      "stopped the other 1 worker(s)")
  log1 = (tmp_path / "logs" / "worker_1.log").read_text()
  assert log1.splitlines()[1] == "second line"  # the log has no prefixes
  assert "[1] second line" in result.stdout
  for pid in map(int, (tmp_path / "pids.0").read_text().split()):
    assert not alive(pid)
  calls = (pod / "gcloud.log").read_text().splitlines()
  assert sum("describe my-tpu" in c for c in calls) == 1
  assert any("--worker=all" in c and "kill -TERM" in c for c in calls)


# ---------------------------------------------------------------- slurm.sbatch

SLURM = REPO / "launch" / "slurm.sbatch"


def test_slurm_directives_come_before_the_first_command():
  """sbatch reads #SBATCH lines only until the first command of the script."""
  lines = SLURM.read_text().splitlines()
  first_command = next(i for i, l in enumerate(lines[1:], 1)
                       if l.strip() and not l.startswith("#"))
  directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
  assert directives and max(directives) < first_command
  assert any("--kill-on-bad-exit=1" in l for l in lines if l.startswith("srun"))
  assert subprocess.run(["bash", "-n", str(SLURM)]).returncode == 0


FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stands in for srun on one node: 2 tasks with the variables Slurm gives each task.
    while [[ "$1" == --* ]]; do shift; done
    for i in 0 1; do
      SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2 SLURM_PROCID=$i \\
      SLURM_LOCALID=$i SLURM_STEP_NUM_NODES=1 "$@" > "$FAKE_OUT.$i" 2>&1 &
    done
    wait -n && wait -n
    """)


def test_slurm_job_auto_detects_the_cluster(tmp_path):
  """The sbatch script under a stand-in srun: real JAX Slurm auto-detection, 2 tasks."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  (tmp_path / ".venv" / "bin" / "activate").write_text(
      f'PATH="{pathlib.Path(sys.executable).parent}:$PATH"\n')
  port = ports.coordinator_port()
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "SLURM_SUBMIT_DIR": str(tmp_path), "FAKE_OUT": str(tmp_path / "out"),
         "JAX_COORDINATOR_PORT": str(port), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}
  result = subprocess.run(["bash", str(SLURM), "python", "-c", SLURM_PROGRAM],
                          capture_output=True, text=True, env=env, timeout=150)
  outputs = [(tmp_path / f"out.{i}").read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + "".join(o[-2000:] for o in outputs)
  for i, out in enumerate(outputs):
    assert (tmp_path / f"out.{i}.result").read_text() == f"slurm {i} 2 4 [1. 2.]", out[-2000:]


# Joins through auto-detection and all-gathers one value per process. The result goes to
# its own file: Gloo's C++ logging can land in the middle of a line of the task's output.
SLURM_PROGRAM = textwrap.dedent("""\
    import os
    import numpy as np
    from imagen_jax.parallel import hosts
    info = hosts.initialize()  # no flags: the SLURM_* variables
    import jax
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.float32(jax.process_index() + 1))
    with open(f"{os.environ['FAKE_OUT']}.{jax.process_index()}.result", "w") as f:
      f.write(f"{info.method} {jax.process_index()} {jax.process_count()} "
              f"{jax.device_count()} {gathered}")
    """)


# ---------------------------------------------------------------- gke_jobset.py

GKE_JOBSET = REPO / "launch" / "gke_jobset.py"
K8S_COMMAND = [*USER_COMMAND, "--gin.CACHE_DIR='$(HOME)/cache'"]


def render_jobset(*options, command=K8S_COMMAND):
  import yaml
  result = subprocess.run([sys.executable, str(GKE_JOBSET), *options, "--", *command],
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  return yaml.safe_load(result.stdout)


def pod_of(jobset):
  (replicated,) = jobset["spec"]["replicatedJobs"]
  return replicated, replicated["template"]["spec"], \
      replicated["template"]["spec"]["template"]["spec"]


def test_gke_jobset_tpu_slice_manifest(tmp_path):
  jobset = render_jobset("--name=base64", "--image=gcr.io/p/imagen:1", "--tpu=v5p",
                         "--topology=4x4x4", "--env=XLA_FLAGS=--xla_dump_to=/tmp/d")
  assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  assert jobset["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  replicated, job, pod = pod_of(jobset)
  assert (replicated["name"], replicated["replicas"]) == ("workers", 1)
  # 4x4x4 = 64 chips, 4 per host: 16 pods, one per host, indexed 0..15.
  assert (job["parallelism"], job["completions"], job["completionMode"]) == (16, 16, "Indexed")
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x4"}
  (container,) = pod["containers"]
  assert container["resources"] == {"limits": {"google.com/tpu": 4}}
  env = {e["name"]: e["value"] for e in container["env"]}
  # JobSet's pod DNS name: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>.
  assert env["IMAGEN_COORDINATOR"] == "base64-workers-0-0.base64:1234"
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"

  # Pod 5 runs the command as Kubernetes would: $(VAR) expansion (none left but the
  # escaped one), then bash; the program gets every argument intact plus the flags that
  # hosts.initialize reads.
  program = tmp_path / "imagen-train"
  program.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                     "print(json.dumps(sys.argv[1:]))\n")
  program.chmod(0o755)
  command = [arg.replace("$$(", "$(") for arg in container["command"]]
  result = subprocess.run(command, capture_output=True, text=True, timeout=30, env={
      **env, "JOB_COMPLETION_INDEX": "5", "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  argv = json.loads(result.stdout)
  assert argv[:len(K8S_COMMAND) - 1] == K8S_COMMAND[1:]
  import argparse
  from imagen_jax.parallel import hosts
  parser = argparse.ArgumentParser()
  hosts.add_distributed_flags(parser)
  flags = parser.parse_args(argv[len(K8S_COMMAND) - 1:])
  assert (flags.coordinator_address, flags.process_count, flags.process_index) == (
      "base64-workers-0-0.base64:1234", 16, 5)


def test_gke_jobset_gpu_nodes_and_one_host():
  jobset = render_jobset("--name=embed", "--image=img", "--gpus_per_host=8", "--hosts=4",
                         "--gpu=nvidia-h100-80gb", "--namespace=ml",
                         "--service_account=gcs-writer")
  assert "annotations" not in jobset["metadata"]
  assert jobset["metadata"]["namespace"] == "ml"
  _, job, pod = pod_of(jobset)
  assert job["parallelism"] == 4 and pod["serviceAccountName"] == "gcs-writer"
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 8}}
  # One host: the command as given, no multi-process flags.
  _, job, pod = pod_of(render_jobset("--name=one", "--image=img", "--tpu=v5e",
                                     "--topology=2x2", command=["imagen-plan", "--x=1"]))
  assert job["parallelism"] == 1
  assert pod["containers"][0]["command"] == ["imagen-plan", "--x=1"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"


@pytest.mark.parametrize("options, message", [
    (["--name=Base", "--tpu=v4", "--topology=2x2x2"], "--name='Base' must be a DNS label"),
    (["--name=a", "--tpu=v4", "--topology=2x2x2", "--gpus_per_host=8"], "either --tpu"),
    (["--name=a", "--tpu=v4"], "needs --topology"),
    (["--name=a", "--tpu=v4", "--topology=2x2x2", "--hosts=4"], "has 2 hosts"),
    (["--name=a", "--tpu=v4", "--topology=3x3"], "not a multiple"),
    (["--name=a", "--gpus_per_host=8"], "need --hosts=N and --gpu"),
])
def test_gke_jobset_bad_options_exit_2_with_one_line(options, message):
  result = subprocess.run([sys.executable, str(GKE_JOBSET), "--image=i", *options, "--",
                           "imagen-train"], capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and result.stdout == ""
  assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
def test_coordinator_port_is_free_and_outside_the_ephemeral_range(tmp_path):
  """A port the kernel never hands out implicitly (see parallel/ports.py), free now."""
  import random
  import socket
  low, high = ports.ephemeral_range()
  picked = {ports.coordinator_port(random.Random(seed)) for seed in range(20)}
  assert all(ports.LOWEST <= p <= 65535 and not low <= p <= high for p in picked)
  assert len(picked) > 1  # random: concurrent jobs rarely try the same port
  fake = tmp_path / "range"
  fake.write_text("40000\t50000\n")
  assert ports.ephemeral_range(str(fake)) == (40000, 50000)
  assert ports.ephemeral_range(str(tmp_path / "missing")) == ports.DEFAULT_EPHEMERAL
  with socket.socket() as s:  # a port in use is not free
    s.bind(("127.0.0.1", 0))
    s.listen()
    assert not ports.is_free(s.getsockname()[1])
  # The launcher prints one such port when none is given.
  out = subprocess.run([sys.executable, str(REPO / "imagen_jax" / "parallel" / "ports.py")],
                       capture_output=True, text=True, timeout=30)
  port = int(out.stdout)
  assert not low <= port <= high
