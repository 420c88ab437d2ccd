"""The ``fnbp`` command line: ``fnbp train`` and ``fnbp check``.

Bad arguments end in a one-line ``fnbp: error: …`` message and exit code 2, before anything is
written; ``fnbp check`` exits 1 when the cross-check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

DATASETS = ("digits", "mnist1d", "mnist", "teacher_student")
OPTIMIZERS = ("sgd", "adam")
DEFAULT_SIZES = {
    "digits": "64,128,128,10",
    "mnist1d": "40,256,256,10",
    "mnist": "784,256,256,10",
    "teacher_student": "16,64,1",
}


class UsageError(Exception):
    """A bad command-line argument: reported in one line, exit code 2."""


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


def _parser() -> argparse.ArgumentParser:
    from fnbp.activations import ACTIVATIONS
    from fnbp.initializers import SCHEMES
    from fnbp.losses import LOSSES

    parser = argparse.ArgumentParser(
        prog="fnbp",
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

    t = sub.add_parser("train", help="train an MLP and write metrics, config and params")
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
    t.add_argument("--out", help="run folder (default runs/<dataset>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    c = sub.add_parser("check", help="cross-check the hand-written grads on random data")
    model_args(c, "784,16,16,10")
    c.add_argument("--batch-size", type=_positive(int), default=32)
    c.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
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


def _train(args) -> int:
    import jax
    import optax

    from fnbp.initializers import init_params
    from fnbp.io import save_params
    from fnbp.model import MLP
    from fnbp.report import check_out, environment
    from fnbp.train import fit

    sizes = args.sizes or _sizes(DEFAULT_SIZES[args.dataset])
    regression = args.dataset == "teacher_student"
    args.loss = args.loss or ("mse" if regression else "softmax_cross_entropy")
    if regression and args.loss != "mse":
        raise UsageError(
            f"--dataset teacher_student is a regression task: use --loss mse, not {args.loss}"
        )
    model = MLP(sizes, args.activation, args.loss, args.output_activation)
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
    if args.optimizer == "sgd":
        optimizer = optax.sgd(args.lr, momentum=args.momentum or None)
    else:
        optimizer = optax.adam(args.lr)

    out.mkdir(parents=True, exist_ok=True)  # arguments are good: only now is anything written
    config = {k: v for k, v in vars(args).items() if k not in ("command",)}
    config.update(sizes=list(sizes), out=str(out), **environment())
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    start = time.perf_counter()

    def log(record):
        record = dict(record, seconds=round(time.perf_counter() - start, 3))
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    key = jax.random.key(args.seed)
    k_init, k_data = jax.random.split(key)
    params = init_params(k_init, model, args.init)
    params, _, history = fit(
        model, optimizer, params, ds.x_train, ds.y_train,
        key=k_data, epochs=args.epochs, batch_size=args.batch_size, grads=args.grads, l2=args.l2,
        x_test=ds.x_test, y_test=ds.y_test, progress=not args.no_progress, on_epoch=log,
    )  # fmt: skip
    save_params(out / "params.npz", params, model)
    final = history[-1]
    seconds = time.perf_counter() - start
    if "test_accuracy" in final:
        print(
            f"final test accuracy: {final['test_accuracy']:.4f}  ({args.epochs} epochs, {seconds:.1f} s)"
        )
    else:
        print(f"final test loss: {final['test_loss']:.6f}  ({args.epochs} epochs, {seconds:.1f} s)")
    print(f"run folder: {out}")
    return 0


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
        report = crosscheck(params, model, x, y, l2=args.l2, finite_differences=not args.no_fd)
    print(report)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fnbp`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _check(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"fnbp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fnbp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
