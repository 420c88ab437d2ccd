#!/usr/bin/env bash
# Install fnbp with its dev extras (scripts/setup.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k backprop
#
# Two pytest-xdist workers (FNBP_TEST_WORKERS, default 2: these machines have 2 cores) take a
# test file at a time (so its module fixtures run once) and share a persistent XLA compilation
# cache in a fresh temporary folder, removed at the end: the suite compiles the same programs
# many times over (new jit wrappers, CLI subprocesses); a fresh folder carries nothing over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
.venv/bin/python -m pytest -n "${FNBP_TEST_WORKERS:-2}" --dist loadfile "$@"
