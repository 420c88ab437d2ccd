#!/usr/bin/env bash
# Install fnbp with its dev extras (scripts/setup.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k backprop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
