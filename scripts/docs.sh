#!/usr/bin/env bash
# Build the documentation site into site/ (or OUT_DIR) with mkdocs build --strict: a broken link
# or anchor, a page missing from the nav, a missing snippet or a docstring naming a parameter the
# signature lacks fails the build. Installs fnbp with its docs extras first (scripts/setup.sh).
# Usage: bash scripts/docs.sh [OUT_DIR]          then open OUT_DIR/index.html
#        bash scripts/docs.sh --serve            a live preview at http://127.0.0.1:8000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh docs
export NO_MKDOCS_2_WARNING=1  # Material's banner about MkDocs 2.0, not about this site
if [ "${1:-}" = "--serve" ]; then
  exec .venv/bin/mkdocs serve --strict
fi
.venv/bin/mkdocs build --strict --site-dir "${1:-site}"
echo "docs: ${1:-site}/index.html"
