"""Benchmark harness (the command line of the ``scripts/bench/`` package; see its docstring).

Usage::

    .venv/bin/python scripts/bench.py                  # the full run (~3 min on a 2-core CPU)
    .venv/bin/python scripts/bench.py --quick          # every section at toy sizes, for tests
    .venv/bin/python scripts/bench.py --configs small --no-torch

Writes ``benchmarks/<device-kind>.json`` and ``.md`` (``<device-kind>-quick.*`` in quick mode).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package beside this file

from bench.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
