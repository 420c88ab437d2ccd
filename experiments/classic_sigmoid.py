"""The textbook network: three-layer sigmoid MLP with the quadratic cost, trained by the
hand-written backprop (Nielsen, *Neural Networks and Deep Learning*, ch. 1-2).

64-30-10 on digits (raw intensities in [0, 1]), sigmoid hidden and output units, C = ½‖a − y‖² (``loss="mse"`` with
one-hot targets), plain SGD with η = 3.0 on mini-batches of 10, 30 epochs. Reports the test
accuracy after every epoch.

    python experiments/classic_sigmoid.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
import optax

import fnbp
from fnbp import data, report, train


def parse_args(argv):
    p = report.experiment_parser("classic_sigmoid", __doc__)
    p.add_argument("--hidden", type=int, default=30)
    p.add_argument("--lr", type=float, default=3.0, help="η")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 5
    if args.hidden < 1 or args.batch_size < 1 or args.epochs < 1 or not args.lr > 0:
        p.error("--hidden, --batch-size, --epochs and --lr must be positive")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    run_dir = report.start_run("classic_sigmoid", args)
    ds = data.load_digits(seed=args.seed, scale="unit")  # pixel intensities in [0, 1], as the book
    model = fnbp.MLP((ds.num_features, args.hidden, ds.num_classes), "sigmoid", "mse", "sigmoid")
    k_init, k_data = jax.random.split(jax.random.key(args.seed))
    # Nielsen draws weights and biases from N(0, 1): σ_w² = fan_in, biases σ_b = 1.
    params = fnbp.init_params(k_init, model, fnbp.normal_scheme(1.0, bias_std=1.0, name="N(0,1)"))
    start = time.perf_counter()
    params, _, history = train.fit(
        model, optax.sgd(args.lr), params, ds.x_train, ds.y_train, key=k_data,
        epochs=args.epochs, batch_size=args.batch_size, grads="manual",
        x_test=ds.x_test, y_test=ds.y_test,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    acc = [r["test_accuracy"] for r in history]

    fig, axes = report.figure(1, 1, (5.5, 3.8))
    ax = axes[0][0]
    ax.plot(np.arange(1, args.epochs + 1), acc, "o-", ms=3)
    ax.set(
        xlabel="epoch",
        ylabel="test accuracy",
        title=f"64-{args.hidden}-10 sigmoid, quadratic cost, η = {args.lr:g}",
    )
    ax.grid(alpha=0.3)
    figure = report.save_figure(fig, run_dir / "accuracy.png")
    report.save_json(run_dir / "results.json", {"history": history, "seconds": seconds})
    table = report.markdown_table(
        ["epoch", "test accuracy", "train loss"],
        [[r["epoch"], f"{r['test_accuracy']:.4f}", r["train_loss"]] for r in history],
    )
    (run_dir / "report.md").write_text(
        f"""# The classic network: 64-{args.hidden}-10 sigmoid, quadratic cost

Nielsen's textbook setting on digits (pixel intensities in [0, 1]): sigmoid units, C = ½‖a − y‖² with one-hot y, weights and biases
from N(0, 1), plain SGD with η = {args.lr:g} on mini-batches of {args.batch_size}, {args.epochs} epochs, gradients by the
hand-written backprop. Final test accuracy **{acc[-1]:.4f}** (best {max(acc):.4f}, epoch {int(np.argmax(acc)) + 1}).
Run time {seconds:.1f} s.

![accuracy]({figure})

{table}
"""
    )
    print(f"final test accuracy: {acc[-1]:.4f}")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
