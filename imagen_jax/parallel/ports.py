"""A free TCP port for a JAX coordinator, chosen where nothing else will take it.

A port from `bind(("", 0))` is in the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default). Released and bound
again seconds later by the coordinator, it can meanwhile become the source port of any
outgoing connection on the machine, the peers' own first connection attempts included (a
client dialling a local port that nobody listens on yet can even connect to itself). A port
outside that range is never handed out implicitly, so once checked free it stays free
unless someone binds that very number, as JAX's Slurm default (61440-65535) also relies on.

Standard library only: `launch/multiprocess_cpu.sh` runs this file as a script
(`python3 imagen_jax/parallel/ports.py` prints a port).
"""

from __future__ import annotations

import random
import socket

LOWEST = 20000  # below this sit many well-known services
DEFAULT_EPHEMERAL = (32768, 60999)


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
  """The kernel's ephemeral port range (Linux), else the Linux default."""
  try:
    with open(path) as f:
      low, high = (int(x) for x in f.read().split())
    return low, high
  except (OSError, ValueError):
    return DEFAULT_EPHEMERAL


def is_free(port: int) -> bool:
  """Whether `port` can be bound on the loopback addresses right now (IPv4 and IPv6)."""
  for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))
    except OSError as e:
      if family == socket.AF_INET6 and not socket.has_ipv6:
        continue
      if family == socket.AF_INET6 and e.errno in (97, 99):  # no IPv6 on this machine
        continue
      return False
  return True


def coordinator_port(rng: random.Random | None = None, attempts: int = 200) -> int:
  """A free port in [LOWEST, 65535] outside the ephemeral range, picked at random (so that
  concurrent jobs rarely try the same one)."""
  rng = rng or random.Random()
  low, high = ephemeral_range()
  candidates = [p for p in range(LOWEST, 65536) if not low <= p <= high]
  if not candidates:
    raise RuntimeError(f"no port outside the ephemeral range {low}-{high}")
  for _ in range(attempts):
    port = rng.choice(candidates)
    if is_free(port):
      return port
  raise RuntimeError(f"no free port found outside the ephemeral range {low}-{high}")


if __name__ == "__main__":
  print(coordinator_port())
