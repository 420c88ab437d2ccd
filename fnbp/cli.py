"""The ``fnbp`` command line: ``fnbp train`` and ``fnbp check``.

Bad arguments end in a one-line ``fnbp: error: …`` message and exit code 2, before anything is
written; ``fnbp check`` exits 1 when the cross-check fails, ``fnbp train`` when training
diverges. ``fnbp train`` checkpoints as it goes; SIGINT or SIGTERM make it save a checkpoint and
exit (130 or 143), and ``fnbp train --resume RUN_DIR`` continues the run bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

DATASETS = ("digits", "mnist1d", "mnist", "teacher_student")
OPTIMIZERS = ("sgd", "adam")
DEFAULT_SIZES = {
    "digits": "64,128,128,10",
    "mnist1d": "40,256,256,10",
    "mnist": "784,256,256,10",
    "teacher_student": "16,64,1",
}


# The settings a run folder's config.json keeps and --resume reads back.
TRAIN_SETTINGS = (
    "dataset", "data_dir", "sizes", "activation", "loss", "output_activation", "init", "seed",
    "l2", "optimizer", "lr", "momentum", "batch_size", "epochs", "grads", "compute_dtype",
    "checkpoint_every", "on_nonfinite", "devices",
)  # fmt: skip
COMPUTE_DTYPES = ("float32", "bfloat16")


class UsageError(Exception):
    """A bad command-line argument: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away); with ``raise_errors``
    they raise :class:`UsageError` instead of exiting."""

    def __init__(self, *args, raise_errors: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message):
        if self.raise_errors:
            raise UsageError(f"{self.prog}: {message}")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes must be comma-separated integers like 64,128,10, got {text!r}"
        ) from None


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0 (and finite), got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be >= 0 (and finite), got {text}")
    return value


def _devices(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}")
    return value


def _parser(raise_errors: bool = False) -> argparse.ArgumentParser:
    from fnbp.activations import ACTIVATIONS
    from fnbp.initializers import SCHEMES
    from fnbp.losses import LOSSES

    parser = _Parser(
        prog="fnbp",
        raise_errors=raise_errors,
        description="Functional MLPs in JAX with a hand-written, cross-checked backprop.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, sizes_default):
        p.add_argument(
            "--sizes", type=_sizes, default=sizes_default, help="layer widths, e.g. 64,128,128,10"
        )
        p.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
        p.add_argument(
            "--loss", choices=sorted(LOSSES),
            help="default: mse for teacher_student, softmax_cross_entropy otherwise",
        )  # fmt: skip
        p.add_argument("--output-activation", default="identity", choices=sorted(ACTIVATIONS))
        p.add_argument("--init", default="he_normal", choices=sorted(SCHEMES), help="init scheme")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--l2", type=_nonnegative_float, default=0.0, help="L2 strength λ")

    t = sub.add_parser(
        "train", help="train an MLP and write metrics, config and params", raise_errors=raise_errors
    )
    t.add_argument("--dataset", default="digits", choices=DATASETS)
    t.add_argument("--data-dir", help="folder with the MNIST IDX files (--dataset mnist)")
    model_args(t, None)
    t.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    t.add_argument("--lr", type=_positive(float), default=0.02, help="learning rate")
    t.add_argument(
        "--momentum", type=_nonnegative_float, default=0.9, help="SGD momentum (0: plain SGD)"
    )
    t.add_argument("--batch-size", type=_positive(int), default=32)
    t.add_argument("--epochs", type=_positive(int), default=30)
    t.add_argument("--grads", default="manual", choices=("manual", "autodiff"))
    t.add_argument(
        "--compute-dtype", default="float32", choices=COMPUTE_DTYPES,
        help="bfloat16: mixed precision (bf16 matmuls, float32 params, loss and softmax)",
    )  # fmt: skip
    t.add_argument(
        "--checkpoint-every", type=_positive(int), metavar="N",
        help="save a checkpoint every N steps within an epoch (always at each epoch's end)",
    )  # fmt: skip
    t.add_argument(
        "--on-nonfinite", default="stop", choices=("stop", "skip"),
        help="a non-finite loss, gradient or update stops the run (default) or its step is skipped",
    )  # fmt: skip
    t.add_argument(
        "--devices", type=_devices, default=1, metavar="N|all",
        help="split each batch over N devices (data parallel; default 1)",
    )  # fmt: skip
    t.add_argument("--out", help="run folder (default runs/<dataset>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, with its saved settings",
    )  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    c = sub.add_parser(
        "check", help="cross-check the hand-written grads on random data", raise_errors=raise_errors
    )
    model_args(c, "784,16,16,10")
    c.add_argument("--batch-size", type=_positive(int), default=32)
    c.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    c.add_argument(
        "--compute-dtype", choices=COMPUTE_DTYPES,
        help="check the mixed-precision gradients (params in --dtype, matmuls in this dtype)",
    )  # fmt: skip
    c.add_argument("--no-fd", action="store_true", help="skip the finite differences")
    return parser


def _load_dataset(args):
    import jax

    from fnbp import data

    if args.dataset == "digits":
        return data.load_digits(seed=args.seed)
    if args.dataset == "mnist1d":
        return data.load_mnist1d(seed=args.seed)
    if args.dataset == "mnist":
        if not args.data_dir:
            raise UsageError("--dataset mnist needs --data-dir FOLDER holding the MNIST IDX files")
        return data.load_mnist(args.data_dir)
    sizes = args.sizes or _sizes(DEFAULT_SIZES["teacher_student"])
    return data.teacher_student(jax.random.key(args.seed), sizes=(sizes[0], 32, sizes[-1]))


class _StopOnSignal:
    """SIGINT and SIGTERM ask training to stop at its next chunk boundary (it then saves a
    checkpoint); a second signal interrupts at once (the state after the last finished chunk
    is saved)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def _resumed(args, argv) -> tuple[Path, argparse.Namespace]:
    """The run folder of ``--resume`` and the arguments saved in its config.json, parsed (and
    so validated) exactly as they were given the first time."""
    extra = sorted({t.split("=")[0] for t in argv if t.startswith("--")} - {"--resume", "--no-progress"})  # fmt: skip
    if extra:
        raise UsageError(
            f"--resume continues a run with the settings saved in its config.json; drop "
            f"{', '.join(extra)}"
        )
    run = Path(args.resume)
    config_path = run / "config.json"
    if not run.is_dir():
        raise UsageError(f"--resume {run}: no such run folder")
    if not config_path.is_file():
        raise UsageError(f"--resume {run}: it has no config.json, so it is not an fnbp train run")
    try:
        config = json.loads(config_path.read_text())
        saved = {k: config[k] for k in TRAIN_SETTINGS}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(
            f"{config_path}: not an fnbp train config ({type(e).__name__}: {e})"
        ) from None
    rebuilt = ["train"]
    for k, v in saved.items():
        if v is not None:
            rebuilt += [
                f"--{k.replace('_', '-')}",
                ",".join(map(str, v)) if k == "sizes" else str(v),
            ]
    try:
        resumed = _parser(raise_errors=True).parse_args(rebuilt)
    except UsageError as e:
        raise UsageError(f"{config_path}: {e}") from None
    resumed.resume, resumed.no_progress = args.resume, args.no_progress
    return run, resumed


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line (NaN as null, ±inf as "inf"), replacing ``path`` atomically."""
    from fnbp.io import _atomic_write_bytes
    from fnbp.report import _jsonable

    text = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
    _atomic_write_bytes(path, text.encode())


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping lines a killed run may have left half-written."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def _train(args, argv) -> int:
    with _StopOnSignal() as stop:
        return _run_training(args, argv, stop)


def _run_training(args, argv, stop: _StopOnSignal) -> int:
    import jax
    import optax

    from fnbp import checkpoint
    from fnbp.initializers import init_params
    from fnbp.io import save_params
    from fnbp.model import MLP
    from fnbp.report import check_out, environment, save_json
    from fnbp.train import Interrupted, data_mesh, fit

    resume = args.resume is not None
    if resume:
        out, args = _resumed(args, argv)
    sizes = args.sizes or _sizes(DEFAULT_SIZES[args.dataset])
    regression = args.dataset == "teacher_student"
    args.loss = args.loss or ("mse" if regression else "softmax_cross_entropy")
    if regression and args.loss != "mse":
        raise UsageError(
            f"--dataset teacher_student is a regression task: use --loss mse, not {args.loss}"
        )
    model = MLP(sizes, args.activation, args.loss, args.output_activation)
    if not resume:
        out = check_out(args.dataset, args.out, args.overwrite, root="runs")
    ds = _load_dataset(args)
    if ds.num_features != sizes[0] or ds.num_outputs != sizes[-1]:
        raise UsageError(
            f"--sizes {','.join(map(str, sizes))} does not fit dataset {args.dataset}: it has "
            f"{ds.num_features} features and {ds.num_outputs} outputs, so sizes must start with "
            f"{ds.num_features} and end with {ds.num_outputs}"
        )
    if args.batch_size > len(ds.x_train):
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {len(ds.x_train)} training examples"
        )
    mesh = None
    if args.devices != 1:
        try:
            mesh = data_mesh(args.devices)
        except ValueError as e:
            raise UsageError(f"--devices {args.devices}: {e}") from None
        if args.batch_size % mesh.size:
            raise UsageError(
                f"--batch-size {args.batch_size} must be divisible by the {mesh.size} devices"
            )
    if args.optimizer == "sgd":
        optimizer = optax.sgd(args.lr, momentum=args.momentum or None)
    else:
        optimizer = optax.adam(args.lr)

    checkpoints = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    settings = {k: getattr(args, k) for k in TRAIN_SETTINGS}
    settings.update(sizes=list(sizes), loss=args.loss)
    if args.data_dir:
        settings["data_dir"] = str(Path(args.data_dir).resolve())
    if resume:
        latest = checkpoint.latest_checkpoint(checkpoints)
        print(
            f"resuming {out} from {latest.name}" if latest else
            f"resuming {out}: no checkpoint yet, starting from the beginning",
            file=sys.stderr,
        )  # fmt: skip
        records = _read_jsonl(metrics_path)
    else:  # arguments are good: only now is anything written
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
        if args.overwrite:  # an earlier run's checkpoints and params would be taken for ours
            for old in checkpoint.list_checkpoints(checkpoints):
                old.unlink()
            (out / "params.npz").unlink(missing_ok=True)
        save_json(out / "config.json", {**settings, "out": str(out), **environment()})
        records = []
        _write_jsonl(metrics_path, records)

    def log(record):
        nonlocal records  # a resumed run replaces the records its predecessor wrote past its checkpoint
        records = [r for r in records if r["epoch"] < record["epoch"]] + [record]
        _write_jsonl(metrics_path, records)

    key = jax.random.key(args.seed)
    k_init, k_data = jax.random.split(key)
    params = init_params(k_init, model, args.init)
    try:
        params, _, history = fit(
            model, optimizer, params, ds.x_train, ds.y_train,
            key=k_data, epochs=args.epochs, batch_size=args.batch_size, grads=args.grads,
            l2=args.l2, compute_dtype=_compute_dtype(args.compute_dtype), x_test=ds.x_test,
            y_test=ds.y_test, on_nonfinite=args.on_nonfinite,
            checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every, resume=resume,
            config=settings, mesh=mesh, should_stop=stop, progress=not args.no_progress,
            on_epoch=log,
        )  # fmt: skip
    except Interrupted as e:
        signum = stop.signum or signal.SIGINT
        print(
            f"fnbp: {signal.Signals(signum).name}: stopped after step {e.step}; checkpoint "
            f"{e.checkpoint}; continue with: fnbp train --resume {out}",
            file=sys.stderr,
        )
        return 128 + signum
    _write_jsonl(metrics_path, history)
    save_params(out / "params.npz", params, model)
    final = history[-1]
    if "test_accuracy" in final:
        print(
            f"final test accuracy: {final['test_accuracy']:.4f}  ({args.epochs} epochs, "
            f"{final['seconds']:.1f} s)"
        )
    else:
        print(
            f"final test loss: {final['test_loss']:.6f}  ({args.epochs} epochs, "
            f"{final['seconds']:.1f} s)"
        )
    print(f"run folder: {out}")
    return 0


def _compute_dtype(name: str | None):
    """``None`` for float32 (compute in the params' dtype), else the jnp dtype."""
    import jax.numpy as jnp

    return None if name in (None, "float32") else jnp.dtype(name)


def _check(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fnbp.crosscheck import crosscheck
    from fnbp.initializers import init_params
    from fnbp.model import MLP

    args.loss = args.loss or "softmax_cross_entropy"
    model = MLP(args.sizes, args.activation, args.loss, args.output_activation)
    dtype = {"float32": jnp.float32, "float64": np.float64, "bfloat16": jnp.bfloat16}[args.dtype]
    with jax.enable_x64(args.dtype == "float64"):
        k_p, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
        params = init_params(k_p, model, args.init, dtype=dtype)
        x = jax.random.normal(k_x, (args.batch_size, model.sizes[0]), dtype)
        n_out = model.sizes[-1]
        if args.loss == "softmax_cross_entropy":
            y = jax.random.randint(k_y, (args.batch_size,), 0, n_out)
        elif args.loss == "sigmoid_binary_cross_entropy":
            y = jax.random.bernoulli(k_y, 0.5, (args.batch_size, n_out)).astype(dtype)
        else:
            y = jax.random.normal(k_y, (args.batch_size, n_out), dtype)
        report = crosscheck(
            params, model, x, y, l2=args.l2, finite_differences=not args.no_fd,
            compute_dtype=_compute_dtype(args.compute_dtype),
        )  # fmt: skip
    print(report)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fnbp`` console script."""
    from fnbp.train import NonFiniteError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        return _train(args, argv) if args.command == "train" else _check(args)
    except NonFiniteError as e:
        print(f"fnbp: error: {e}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, TypeError, OSError) as e:  # OSError: files and folders
        print(f"fnbp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fnbp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
