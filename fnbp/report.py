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


def layer_colors(n: int) -> list:
    """``n`` colours running along viridis, one per layer from the first (dark) to the last."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def log_positive(v) -> np.ndarray:
    """``v`` with zeros and negatives as NaN, for a log axis."""
    v = np.array(v, dtype=float)
    v[~(v > 0)] = np.nan
    return v


def log_axes(ax, title: str, xlabel: str, ylabel: str, names: list | None = None) -> None:
    """Finish a log-scale panel: title, labels, grid and a legend (for more than 12 ``names``, a
    line saying the colour runs from the first layer to the last instead)."""
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if names is None or len(names) <= 12:
        ax.legend(fontsize=7)
    else:  # too many lines to name: the colour runs from the first layer to the last
        ax.text(0.01, 0.02, f"colour: {names[0]} (dark) … {names[-1]} (light)",
                transform=ax.transAxes, fontsize=7)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# fnbp train's report.md, from the files of its run folder


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The epoch records of a ``metrics.jsonl``, in order, skipping lines a killed run may have
    left half-written (and anything that is not a record with an integer ``epoch``); ``[]``
    when the file is missing."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def run_model(config: dict):
    """The :class:`fnbp.MLP` or :class:`fnbp.Net` an ``fnbp train`` config.json describes: the
    net's full spec (``"net"``) where it has one, else the MLP of ``sizes``."""
    from fnbp.model import MLP
    from fnbp.net import Net

    if config.get("net") is not None:
        return Net.from_dict(config["net"])
    return MLP(
        tuple(config["sizes"]), config["activation"], config["loss"], config["output_activation"]
    )


# What the final-metrics table shows, in this order, where a record has it.
_FINAL = (
    ("train_loss", "train loss (mean over the epoch's steps)"),
    ("test_loss", "test loss"),
    ("test_accuracy", "test accuracy"),
    ("val_loss", "validation loss"),
    ("val_accuracy", "validation accuracy"),
    ("best_epoch", "best epoch so far (early stopping)"),
    ("skipped_steps", "skipped non-finite steps"),
    ("dp_clipped_fraction", "DP-SGD: fraction of the batch clipped"),
    ("dp_epsilon", "DP-SGD: ε after this epoch"),
    ("step", "steps"),
    ("seconds", "seconds (training, compilation included)"),
)


def train_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` of an ``fnbp train`` run folder from its files, and return its path.

    Reads ``config.json``, ``metrics.jsonl`` (the epochs finished so far: a finished,
    interrupted or diverged run alike), ``privacy.json`` (DP-SGD) and whether ``params.npz``
    exists (the run finished). Writes, beside them, ``training.png`` (train loss and the
    test and validation metrics per epoch, and each weight layer's ‖∂L/∂W‖_F, the mean over
    each epoch's steps, where the records have ``grad_norms``) and, for
    a run with ``--instruments``, the instruments' figures
    (:func:`fnbp.instruments.training.report_section`). The report: the command, where the
    run stands, the last epoch's metrics, the figures, the privacy accounting, the instruments
    and every setting of config.json.

    Arguments:
        run_dir: the run folder.

    Returns:
        the path of ``report.md``.

    Raises:
        FileNotFoundError: if ``run_dir`` has no config.json.
        ValueError: if config.json is not an ``fnbp train`` config.
    """
    from fnbp.instruments.training import left_out, report_section

    folder = Path(run_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so it is not an fnbp train run folder")
    try:
        config = json.loads(config_path.read_text())
        model = run_model(config)
        epochs = int(config["epochs"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{config_path}: not an fnbp train config ({type(e).__name__}: {e})"
        ) from None
    records = read_jsonl(folder / "metrics.jsonl")

    lines = [f"# fnbp train: {folder.name}", ""]
    if config.get("command"):
        lines += ["```", config["command"], "```", ""]
    lines += [_run_status(folder, config, records, epochs), ""]
    if records:
        last = records[-1]
        rows = [(what, _value(last[k])) for k, what in _FINAL if k in last]
        best = last.get("best_epoch")
        if best and best != last["epoch"] and best <= len(records):  # early stopping kept it
            kept = records[best - 1]
            rows += [(f"{what}, epoch {best} (the params kept)", _value(kept[k]))
                     for k, what in _FINAL[1:3] if k in kept]  # fmt: skip
        lines += [f"## Final metrics (epoch {last['epoch']})", "", markdown_table(["", "value"], rows), ""]  # fmt: skip
        lines += _training_figure(folder, records, model)
    privacy_path = folder / "privacy.json"
    if config.get("dp_clip") is not None and privacy_path.is_file():
        lines.append(privacy_section(json.loads(privacy_path.read_text())))
    if config.get("instruments"):
        names = config.get("instrument_layers") or _instrument_names(model)
        lines.append(report_section(folder, records, names, every=config["instruments_every"],
                                    note=left_out(model)))  # fmt: skip
    hidden = ("net", "command", "instrument_layers")
    settings = [(k, _value(v)) for k, v in config.items() if k not in hidden]
    lines += ["## Config", "", "Every setting of config.json but the command (above), the net's "
              "full spec (its `net` entry) and the instruments' layer names.", ""]  # fmt: skip
    if config.get("net") is not None:
        kinds = ", ".join(f"{i} {layer.kind}" for i, layer in enumerate(model.layers, start=1))
        lines += [f"The net: {len(model.layers)} layers ({kinds}).", ""]
    lines += [markdown_table(["setting", "value"], settings), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _value(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "–" if v is None else str(v).replace("|", "\\|")


def _run_status(folder: Path, config: dict, records: list[dict], epochs: int) -> str:
    """One paragraph: finished or not, how far, how to continue."""
    done = records[-1]["epoch"] if records else 0
    steps = records[-1]["step"] if records else 0
    if (folder / "params.npz").is_file():
        if config.get("early_stopping") is not None and records:
            best = records[-1].get("best_epoch")
            return (
                f"Finished: early stopping ran {done} of {epochs} epochs ({steps} steps); "
                f"params.npz holds epoch {best}'s params."
            )
        return f"Finished: {done} of {epochs} epochs, {steps} steps; the params are in params.npz."
    return (
        f"Not finished: {done} of {epochs} epochs recorded ({steps} steps) and no params.npz: "
        f"the run was interrupted or diverged (its error says which). Continue it with "
        f"`fnbp train --resume {folder}`."
    )


def _training_figure(folder: Path, records: list[dict], model) -> list[str]:
    """``training.png``, one figure (one save: a figure costs ~0.5 s on a 2-core CPU): the losses
    per epoch (log scale); for classifiers the accuracies; where the records have
    ``grad_norms``, each weight layer's ‖∂L/∂W‖_F, the mean over the epoch's steps (log
    scale). Then a table of those norms at the first and the last epoch."""
    from matplotlib.ticker import MaxNLocator

    from fnbp.train import weight_layers

    epoch = [r["epoch"] for r in records]
    has = lambda k: any(k in r for r in records)  # noqa: E731
    series = lambda k: [np.nan if r.get(k) is None else r[k] for r in records]  # noqa: E731
    losses = [(k, label) for k, label in (("train_loss", "train"), ("test_loss", "test"),
                                          ("val_loss", "validation")) if has(k)]  # fmt: skip
    accuracies = [(k, label) for k, label in (("test_accuracy", "test"),
                                              ("val_accuracy", "validation")) if has(k)]  # fmt: skip
    normed = [r for r in records if r.get("grad_norms")]
    names = [f"layer {i + 1} ({model.layers[i].kind})" for i in weight_layers(model)]
    if normed and len(normed[0]["grad_norms"]) != len(names):  # records of another model
        names = [f"weight layer {j + 1}" for j in range(len(normed[0]["grad_norms"]))]
    panels = 1 + bool(accuracies) + bool(normed)
    fig, axes = figure(1, panels, size=(4.6, 3.6))
    ax = iter(axes[0])
    a = next(ax)
    for k, label in losses:
        a.plot(epoch, log_positive(series(k)), "o-", ms=3, label=label)
    log_axes(a, "loss per epoch", "epoch", "loss")
    if accuracies:
        a = next(ax)
        for k, label in accuracies:
            a.plot(epoch, series(k), "o-", ms=3, label=label)
        a.set(title="accuracy per epoch", xlabel="epoch", ylabel="accuracy")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    table = []
    if normed:
        g = np.array([[np.nan if v is None else v for v in r["grad_norms"]] for r in normed], float)
        a, colors = next(ax), layer_colors(len(names))
        for j, name in enumerate(names):
            a.plot([r["epoch"] for r in normed], log_positive(g[:, j]), "o-", ms=3,
                   color=colors[j], label=name)  # fmt: skip
        log_axes(a, "‖∂L/∂W‖ per layer", "epoch", "mean over the epoch's steps", names)
        first, last = normed[0]["epoch"], normed[-1]["epoch"]
        table = ["", markdown_table(["layer", f"‖∂L/∂W‖, epoch {first}", f"epoch {last}"],
                                    [(n, g[0, j], g[-1, j]) for j, n in enumerate(names)])]  # fmt: skip
    for a in axes[0]:  # epochs are whole numbers
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    shown = ["train loss (the mean over each epoch's steps)"]
    shown += [f"{label} loss" for k, label in losses[1:]]
    shown += [f"{label} accuracy" for k, label in accuracies]
    shown += ["each layer's ‖∂L/∂W‖_F (a residual block's all together; the mean over the "
              "epoch's steps)"] if normed else []  # fmt: skip
    return ["## Training", "", f"Per epoch: {', '.join(shown)}.", "",
            f"![training]({save_figure(fig, folder / 'training.png')})", *table, ""]  # fmt: skip


def _instrument_names(model) -> list[str]:
    from fnbp.instruments import layer_names

    return layer_names(model)


def privacy_section(accounting: dict) -> str:
    """The DP-SGD part of a run's ``report.md`` from its ``privacy.json`` (``accounting``:
    epsilon, delta, accountant, noise_multiplier, clip_norm, sampling_rate, batch_size,
    n_train, steps, sampling)."""
    a = accounting
    c, s = a["clip_norm"], a["noise_multiplier"]
    return "\n".join([
        "## Privacy (DP-SGD)", "",
        f"Each example's gradient clipped to norm C = {c:g}, Gaussian noise σC = {s:g}·{c:g} on "
        "the sum (one backward pass, fnbp.instruments.privacy).", "",
        f"**ε = {a['epsilon']:.4g} at δ = {a['delta']:g}** after {a['steps']} steps, sampling "
        f"rate q = {a['batch_size']}/{a['n_train']} = {a['sampling_rate']:.4g}, "
        f"{a['accountant']}.", "",
        f"Caveat: {a['sampling']}", "",
    ])  # fmt: skip
