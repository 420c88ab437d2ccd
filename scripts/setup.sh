#!/usr/bin/env bash
# Create .venv (if missing) and install fnbp with what it needs from PyPI.
# Idempotent, and quiet when nothing changed.   Usage: bash scripts/setup.sh [EXTRA ...]
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh dev      # plus pytest, hypothesis, ruff
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=$(IFS=,; echo "${*:-}")
spec="."; [ -n "$extras" ] && spec=".[$extras]"
if [ ! -x .venv/bin/python ]; then
  echo "fnbp setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
# Reinstall only when pyproject.toml or the requested extras changed since the last install.
stamp=".venv/.fnbp-installed${extras:+-$(echo "$extras" | tr ',' '-')}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import fnbp" 2>/dev/null; then
  exit 0
fi
echo "fnbp setup: installing $spec into .venv (the first time takes a minute or two)"
log=$(mktemp)
if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$spec"; } >"$log" 2>&1; then
  tail -n 40 "$log"; echo "fnbp setup: pip install failed (full log: $log)" >&2; exit 1
fi
rm -f "$log"
echo "$want" > "$stamp"
