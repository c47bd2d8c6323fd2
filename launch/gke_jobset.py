#!/usr/bin/env python3
"""Renders a Kubernetes JobSet that runs one command on N hosts of a GKE TPU slice or GPU
node pool, as one JAX job. Prints YAML for `kubectl apply -f -`.

  python3 launch/gke_jobset.py --name=base64 --image=IMAGE --tpu=v5p --topology=4x4x4 \
      -- imagen-train --gin_file=experiments/web_base64.gin --gin.MODEL_DIR="'gs://b/base'" \
      | kubectl apply -f -
  python3 launch/gke_jobset.py --name=embed --image=IMAGE --gpus_per_host=8 --hosts=4 \
      --gpu=nvidia-h100-80gb -- imagen-embed --gin_file=runs/embed.gin ... > embed.yaml

One replicated Job of N pods (Indexed completion, one pod per host), placed by
`cloud.google.com/gke-tpu-accelerator` and `gke-tpu-topology` (TPU, with
`google.com/tpu` chips per pod) or `cloud.google.com/gke-accelerator` (GPU, with
`nvidia.com/gpu`). JobSet gives each pod a stable DNS name,
NAME-workers-0-I.NAME, through its headless service. Each pod runs

  COMMAND ARGS... --coordinator_address=NAME-workers-0-0.NAME:PORT --process_count=N
      --process_index=$JOB_COMPLETION_INDEX

so `hosts.initialize` (every imagen-* CLI that runs on many hosts) joins the job with no
set-up by the user, as under launch/multiprocess_cpu.sh; with one host no flag is added.
If a pod fails, JobSet recreates all of them (up to --max_restarts times) and imagen-train
and imagen-embed resume from what they wrote. SIGTERM (preemption, `kubectl delete`)
comes --grace seconds before SIGKILL: JAX's preemption service makes every host save the
same step.

The image must hold this checkout with its environment (imagen-* on PATH, jax[tpu] or
jax[cuda12]); outputs go to gs:// (or a volume every pod mounts). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOB_NAME = "workers"
# GKE's node label values for TPU slices, by their usual short names.
TPU_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                    "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
DEFAULT_PORT = 1234
# Prepends nothing to the user's command and quotes nothing: bash gets it as "$@".
_RUN = ('exec "$@" --coordinator_address="$IMAGEN_COORDINATOR" '
        '--process_count="$IMAGEN_PROCESS_COUNT" --process_index="$JOB_COMPLETION_INDEX"')
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RenderError(ValueError):
  """Bad options: one line naming the value and the fix."""


def tpu_hosts(topology: str, chips_per_host: int) -> int:
  """Hosts of a TPU slice: chips (the product of the topology) / chips per host."""
  if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", topology):
    raise RenderError(f"--topology={topology!r} is not like 2x2, 4x4 or 4x4x4")
  chips = math.prod(int(n) for n in topology.split("x"))
  if chips % chips_per_host:
    raise RenderError(f"--topology={topology} has {chips} chips, not a multiple of "
                      f"--chips_per_host={chips_per_host}")
  return chips // chips_per_host


def _literal(arg: str) -> str:
  """Kubernetes expands $(NAME) in a container's command; $$( keeps it literal."""
  return arg.replace("$(", "$$(")


def _pod_spec(args: argparse.Namespace, hosts: int) -> dict:
  command = [_literal(arg) for arg in args.command]
  container = {
      "name": "imagen", "image": args.image, "workingDir": args.workdir,
      "env": [{"name": k, "value": v} for k, v in args.env],
      "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
  }
  if hosts > 1:
    container["command"] = ["bash", "-c", _RUN, "imagen-jax", *command]
    container["env"] += [
        {"name": "IMAGEN_COORDINATOR",
         "value": f"{args.name}-{JOB_NAME}-0-0.{args.name}:{args.port}"},
        {"name": "IMAGEN_PROCESS_COUNT", "value": str(hosts)}]
    container["ports"] = [{"name": "coordinator", "containerPort": args.port}]
  else:
    container["command"] = command
  if args.tpu:
    selector = {"cloud.google.com/gke-tpu-accelerator":
                TPU_ACCELERATORS.get(args.tpu, args.tpu),
                "cloud.google.com/gke-tpu-topology": args.topology}
    container["resources"] = {"limits": {"google.com/tpu": args.chips_per_host}}
  else:
    selector = {"cloud.google.com/gke-accelerator": args.gpu}
    container["resources"] = {"limits": {"nvidia.com/gpu": args.gpus_per_host}}
  spec = {
      "restartPolicy": "Never", "nodeSelector": selector,
      "terminationGracePeriodSeconds": args.grace, "containers": [container],
      # NCCL and data-loader workers need more shared memory than the 64 MB default.
      "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
  }
  if args.service_account:
    spec["serviceAccountName"] = args.service_account
  return spec


def render(args: argparse.Namespace) -> dict:
  """The JobSet for the parsed options (a dict, ready for YAML or JSON)."""
  if not _DNS_LABEL.match(args.name) or len(args.name) > 40:
    raise RenderError(f"--name={args.name!r} must be a DNS label of at most 40 characters "
                      "(lower-case letters, digits and '-', starting with a letter): pod "
                      "names add '-workers-0-N' to it")
  if bool(args.tpu) == bool(args.gpus_per_host):
    raise RenderError("give either --tpu=TYPE --topology=AxB[xC] (a TPU slice) or "
                      "--gpus_per_host=G --hosts=N --gpu=ACCELERATOR (GPU nodes)")
  if args.tpu:
    if not args.topology:
      raise RenderError(f"--tpu={args.tpu} needs --topology, e.g. 4x4x4 (GKE's "
                        "cloud.google.com/gke-tpu-topology of the node pool)")
    hosts = tpu_hosts(args.topology, args.chips_per_host)
    if args.hosts not in (None, hosts):
      raise RenderError(f"--hosts={args.hosts} but topology {args.topology} with "
                        f"{args.chips_per_host} chips per host has {hosts} hosts; drop "
                        "--hosts")
  else:
    if args.hosts is None or not args.gpu:
      raise RenderError("GPU nodes need --hosts=N and --gpu=ACCELERATOR (GKE's "
                        "cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb)")
    hosts = args.hosts
  if hosts < 1:
    raise RenderError(f"--hosts={hosts} must be at least 1")
  metadata = {"name": args.name}
  if args.namespace:
    metadata["namespace"] = args.namespace
  if args.tpu:  # one slice per node pool: no two slices share one
    metadata["annotations"] = {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
         "backoffLimit": 0, "template": {"spec": _pod_spec(args, hosts)}}
  return {
      "apiVersion": API_VERSION, "kind": "JobSet", "metadata": metadata,
      "spec": {
          "failurePolicy": {"maxRestarts": args.max_restarts},
          # The coordinator's name resolves before its pod is ready: the others can wait.
          "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
          "replicatedJobs": [{"name": JOB_NAME, "replicas": 1,
                              "template": {"spec": job}}],
      },
  }


def to_yaml(value, indent: int = 0) -> str:
  """Block YAML for dicts, lists and scalars; strings are JSON-quoted (valid YAML)."""
  pad = " " * indent
  if isinstance(value, dict):
    lines = []
    for key, item in value.items():
      if isinstance(item, (dict, list)) and item:
        lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
      else:
        lines.append(f"{pad}{key}: {to_yaml(item)}")
    return "\n".join(lines)
  if isinstance(value, list):
    lines = []
    for item in value:
      if isinstance(item, (dict, list)) and item:
        body = to_yaml(item, indent + 2)
        lines.append(f"{pad}- {body[indent + 2:]}")
      else:
        lines.append(f"{pad}- {to_yaml(item)}")
    return "\n".join(lines)
  return json.dumps(value)


def _env_pair(text: str) -> tuple[str, str]:
  name, sep, value = text.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
    raise argparse.ArgumentTypeError(f"--env={text!r} is not NAME=VALUE")
  return name, value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gke_jobset.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="JobSet name (a DNS label)")
  parser.add_argument("--image", required=True, help="container image with this checkout")
  parser.add_argument("--tpu", default=None,
                      help=f"TPU type: {', '.join(TPU_ACCELERATORS)}, or a GKE "
                      "gke-tpu-accelerator value")
  parser.add_argument("--topology", default=None, help="TPU slice topology, e.g. 4x4x4")
  parser.add_argument("--chips_per_host", type=int, default=4,
                      help="TPU chips per host (google.com/tpu per pod); default 4")
  parser.add_argument("--gpus_per_host", type=int, default=None,
                      help="GPUs per host (nvidia.com/gpu per pod)")
  parser.add_argument("--gpu", default=None,
                      help="GKE's cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb")
  parser.add_argument("--hosts", type=int, default=None,
                      help="number of hosts (pods); for TPU it follows from the topology")
  parser.add_argument("--namespace", default=None)
  parser.add_argument("--service_account", default=None,
                      help="Kubernetes service account (e.g. bound to GCS by Workload "
                      "Identity)")
  parser.add_argument("--env", action="append", type=_env_pair, default=[],
                      metavar="NAME=VALUE", help="environment variable; may repeat")
  parser.add_argument("--workdir", default="/app", help="working directory in the image")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help="jax.distributed coordinator port")
  parser.add_argument("--max_restarts", type=int, default=3,
                      help="JobSet restarts of all pods after a failure")
  parser.add_argument("--grace", type=int, default=300,
                      help="seconds between SIGTERM and SIGKILL")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- COMMAND [ARGS...] run on every host")
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command[:1] == ["--"]:
    args.command = args.command[1:]
  if not args.command:
    parser.error("no COMMAND given after '--'")
  try:
    manifest = render(args)
  except RenderError as e:
    print(f"gke_jobset.py: {e}", file=sys.stderr)
    return 2
  print(to_yaml(manifest))
  return 0


if __name__ == "__main__":
  sys.exit(main())
