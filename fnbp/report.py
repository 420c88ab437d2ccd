"""Run folders, environment records, JSON, markdown tables and figures: what every experiment
and ``fnbp train`` write, in one place.

A run folder holds ``config.json`` (all settings and :func:`environment`), ``results.json``
(every number plotted), PNG figures and ``report.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def check_out(
    name: str, out: str | os.PathLike | None = None, overwrite: bool = False, root: str = "results"
) -> Path:
    """The run folder to use (``<root>/<name>-<timestamp>`` by default), checked but not created.

    Raises:
        FileExistsError: if ``out`` is a file, or a non-empty folder and not ``overwrite``.
    """
    if out:
        path = Path(out)
    else:  # a fresh default folder, even for two runs started within the same second
        stem = Path(root) / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        path, n = stem, 1
        while path.exists():
            n += 1
            path = stem.with_name(f"{stem.name}-{n}")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {path} already exists and is not empty; pass --overwrite to replace it"
        )
    return path


def run_dir(name: str, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """:func:`check_out`, then create the folder."""
    path = check_out(name, out, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    return path


def experiment_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every experiment shares:
    ``--seed``, ``--quick``, ``--out`` and ``--overwrite``."""
    p = argparse.ArgumentParser(prog=f"{name}.py", description=doc.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a reduced run for tests")
    p.add_argument("--out", help=f"run folder (default results/{name}-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return p


def start_run(name: str, args: argparse.Namespace) -> Path:
    """Create the run folder of experiment ``name`` and write its ``config.json``
    (every argument, plus :func:`environment`)."""
    path = run_dir(name, args.out, args.overwrite)
    save_json(path / "config.json", {"experiment": name, **vars(args), **environment()})
    return path


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    """fnbp and jax versions, git commit (when run from a checkout), device kind, Python."""
    import jax

    import fnbp

    return {
        "fnbp_version": fnbp.__version__,
        "git_commit": _git_commit(),
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "python": platform.python_version(),
    }


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return _jsonable(np.asarray(v).tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Path):
        return str(v)
    return v


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (arrays become lists; NaN becomes null, ±inf "inf")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats are shown with 4 significant digits."""

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib (Agg) figure and axes, ``size`` per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    return fig, axes


def save_figure(fig, path: str | os.PathLike) -> str:
    """Save ``fig`` as a PNG, close it, and return the file name (for ``report.md`` links)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name
