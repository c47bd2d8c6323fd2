#!/usr/bin/env bash
# Runs the test suite: creates .venv if missing, installs the package with its test extra,
# and runs pytest on 8 simulated CPU devices. Extra arguments go to pytest:
#   ./launch/test.sh tests/test_diffusion_samplers.py -k ddim
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# Two pytest-xdist workers when there are two cores or more, each taking whole files (a
# module's fixtures are built once): in one process the suite kept 1.3 of 2 cores busy
# (README, "Tests"). `-n 0` runs one process.
workers=0
[ "$(nproc)" -lt 2 ] || workers=2
exec .venv/bin/python -m pytest -q -ra --durations=15 -n "$workers" --dist loadfile "$@"
