#!/usr/bin/env bash
# Install fnbp with its dev extras (scripts/setup.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k backprop
#
# Two pytest-xdist workers (FNBP_TEST_WORKERS, default 2: these machines have 2 cores) take a
# test file at a time (so its module fixtures run once) and share a persistent XLA compilation
# cache in a fresh temporary folder, removed at the end: the suite compiles the same programs
# many times over (new jit wrappers, CLI subprocesses); a fresh folder carries nothing over.
#
# XLA compiles at LLVM optimization level 0 (FNBP_TEST_XLA_OPT, default 0; 2 is XLA's own
# default): the suite's programs are small and run once or a few times, so compiling them is most
# of its time, and level 0 cuts that by about a third (tests/test_backprop.py: 96 s -> 66 s).
# The HLO passes (fusion, layout, algebraic simplification) still run, only LLVM's machine-code
# optimizations are skipped; results can differ in float rounding only, within every test's
# tolerance (the one docs page whose examples print level-dependent rounding noise runs at
# XLA's default level: tests/test_docs_examples.py ROUNDING_PAGES).
# Timings belong to scripts/bench.py, which runs at XLA's defaults. Subprocesses inherit the
# flag (tests that force CPU devices add to it: tests/helpers.py xla_flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 \
  XLA_FLAGS="--xla_backend_optimization_level=${FNBP_TEST_XLA_OPT:-0} ${XLA_FLAGS:-}"
.venv/bin/python -m pytest -n "${FNBP_TEST_WORKERS:-2}" --dist loadfile "$@"
