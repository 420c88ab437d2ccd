"""The ``fnbp`` command line: ``fnbp train``, ``fnbp check`` and ``fnbp report``.

The net is an MLP (``--sizes``), a spec file (``--net FILE.json``, the JSON of
:meth:`fnbp.Net.to_json`) or a preset of :mod:`fnbp.presets` sized for the data (``--arch``).

Bad arguments end in a one-line ``fnbp: error: …`` message and exit code 2, before anything is
written; ``fnbp check`` exits 1 when the cross-check fails, ``fnbp train`` when training
diverges. ``fnbp train`` checkpoints as it goes; SIGINT or SIGTERM make it save a checkpoint and
exit (130 or 143), and ``fnbp train --resume RUN_DIR`` continues the run bit for bit. With
``--early-stopping PATIENCE`` it holds out ``--val-fraction`` of the training set, stops when the
validation loss has not improved for PATIENCE epochs and saves the best epoch's params. With
``--instruments`` every K-th step also records per-layer statistics from its own backward pass
(gradient flow, update sizes, per-example gradient-norm quantiles, the noise scale, dead ReLUs)
into metrics.jsonl and plots them in report.md; with ``--dp-clip C --dp-noise σ`` it trains with
DP-SGD and writes ε (privacy.json, metrics.jsonl, report.md). With ``--coordinator HOST:PORT
--num-processes N --process-id I`` (or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, or ``--cluster slurm``) N processes, one command per host, train one model
data parallel over all their devices (:mod:`fnbp.distributed`); process 0 writes the run folder.
Every run ends by writing report.md (:func:`fnbp.report.train_report`: the config, the final
metrics, the loss and accuracy per epoch, each layer's gradient norm); ``fnbp report RUN_DIR``
rebuilds it from the files of a finished, interrupted or diverged run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
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
# ... and those of validation and early stopping, which config.json files written before them
# lack (read back as None: neither).
VAL_SETTINGS = ("early_stopping", "val_fraction")
DEFAULT_VAL_FRACTION = 0.1  # with --early-stopping and no --val-fraction
# ... and those of a run whose model is a Net: "net" is its full spec (Net.to_dict()), which
# --resume rebuilds it from; the others record how it was chosen. An MLP run has none of them.
NET_SETTINGS = ("net", "net_file", "arch", "depth", "width", "norm", "alpha", "dropout")
# ... and those of the instruments and of DP-SGD (absent from older configs: neither).
EXTRA_SETTINGS = ("instruments", "instruments_every", "dp_clip", "dp_noise", "dp_delta")
DEFAULT_DP_DELTA = 1e-5
COMPUTE_DTYPES = ("float32", "bfloat16")
# How several processes are joined: given to every command, never saved (a resumed run may get a
# new coordinator port), so --resume takes them beside it.
PROCESS_OPTIONS = ("coordinator", "num_processes", "process_id", "cluster")
# The data `fnbp check --arch NAME` sizes a preset for: (features, outputs) of digits or mnist1d.
CHECK_SIZES = {"cnn": (64, 10), "mnist1d_cnn": (40, 10), "resmlp": (64, 10)}
CHECK_RESMLP = {"depth": 3, "width": 16}  # small enough for finite differences of every param


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


def _number(ok, must: str):
    """An argparse ``type``: a float for which ``ok`` holds, else an error saying it ``must``."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    return parse


_nonnegative_float = _number(lambda v: v >= 0 and math.isfinite(v), ">= 0 (and finite)")
_finite_float = _number(math.isfinite, "finite")
_rate = _number(lambda v: 0 <= v < 1, "a drop probability in [0, 1)")
_fraction = _number(lambda v: 0 < v < 1, "a fraction in (0, 1)")
_delta = _number(lambda v: 0 < v < 1, "a probability in (0, 1)")


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
    from fnbp.distributed import CLUSTERS
    from fnbp.initializers import SCHEMES
    from fnbp.losses import LOSSES
    from fnbp.presets import ARCHS, NORMS, RESMLP_DEPTH, RESMLP_WIDTH

    parser = _Parser(
        prog="fnbp",
        raise_errors=raise_errors,
        description="Functional nets in JAX with a hand-written, cross-checked backprop.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, sizes_default, resmlp_default):
        g = p.add_argument_group("the net: one of --sizes, --net, --arch (default: an MLP)")
        g.add_argument(
            "--sizes", type=_sizes, help=f"an MLP of these layer widths (default {sizes_default})"
        )
        g.add_argument(
            "--net", dest="net_file", metavar="FILE.json",
            help="a net spec file: the JSON of fnbp.Net.to_json() (it sets activations and loss)",
        )  # fmt: skip
        g.add_argument(
            "--arch", choices=ARCHS,
            help="a preset net sized for the data: cnn (2-D CNN for square images, e.g. digits), "
            "mnist1d_cnn (three Conv1d of 25 channels, kernels 5/3/3, stride 2), resmlp "
            "(residual MLP: --depth, --width, --norm, --alpha)",
        )  # fmt: skip
        g.add_argument(
            "--depth", type=_positive(int),
            help=f"--arch resmlp: number of residual blocks (default {resmlp_default['depth']})",
        )  # fmt: skip
        g.add_argument(
            "--width", type=_positive(int),
            help=f"--arch resmlp: features of every block (default {resmlp_default['width']})",
        )  # fmt: skip
        g.add_argument(
            "--norm", choices=NORMS,
            help="--arch resmlp: BatchNorm, LayerNorm or no normalization in each block "
            "(default none)",
        )  # fmt: skip
        g.add_argument(
            "--alpha", type=_finite_float,
            help="--arch resmlp: the blocks' branch scale α in x + α·F(x) (default 1/√depth)",
        )  # fmt: skip
        g.add_argument(
            "--dropout", type=_rate, metavar="RATE",
            help="--arch or --sizes: Dropout of this drop probability after the hidden layers "
            "(default 0: none)",
        )  # fmt: skip
        p.add_argument(
            "--activation", choices=sorted(ACTIVATIONS),
            help="hidden activation of --sizes and --arch nets (default relu)",
        )  # fmt: skip
        p.add_argument(
            "--loss", choices=sorted(LOSSES),
            help="default: mse for teacher_student, softmax_cross_entropy otherwise (a --net "
            "file sets its own)",
        )  # fmt: skip
        p.add_argument(
            "--output-activation", choices=sorted(ACTIVATIONS),
            help="activation of the last layer of --sizes and --arch nets (default identity)",
        )  # fmt: skip
        p.add_argument("--init", default="he_normal", choices=sorted(SCHEMES), help="init scheme")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--l2", type=_nonnegative_float, default=0.0, help="L2 strength λ")
        p.set_defaults(resmlp_default=resmlp_default)

    t = sub.add_parser(
        "train",
        help="train a net (an MLP, a --net file or an --arch preset); write metrics, config, "
        "params",
        description="Train a net and write metrics.jsonl, config.json (with the net's full "
        "spec), checkpoints and params.npz to a run folder.",
        raise_errors=raise_errors,
    )  # fmt: skip
    t.add_argument("--dataset", default="digits", choices=DATASETS)
    t.add_argument("--data-dir", help="folder with the MNIST IDX files (--dataset mnist)")
    model_args(t, "per dataset, e.g. 64,128,128,10 for digits",
               {"depth": RESMLP_DEPTH, "width": RESMLP_WIDTH})  # fmt: skip
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
        "--early-stopping", type=_positive(int), metavar="PATIENCE",
        help="stop once the validation loss has not improved for PATIENCE epochs; the best "
        "epoch's params are saved (its number is best_epoch in metrics.jsonl)",
    )  # fmt: skip
    t.add_argument(
        "--val-fraction", type=_fraction, metavar="F",
        help="hold out this fraction of the training set as a validation set (val_loss in "
        f"metrics.jsonl), drawn by --seed (default {DEFAULT_VAL_FRACTION} with "
        "--early-stopping, else none)",
    )  # fmt: skip
    t.add_argument(
        "--devices", type=_devices, metavar="N|all",
        help="split each batch over N devices (data parallel; default 1, all with several "
        "processes: then N counts the devices of all of them)",
    )  # fmt: skip
    g = t.add_argument_group(
        "several processes (jax.distributed)",
        "run the same command in every process (one per host), each with its own --process-id; "
        "process 0 writes the run folder (--out), which every process must see",
    )  # fmt: skip
    g.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help="process 0's address and a free port on it (default: $JAX_COORDINATOR_ADDRESS)",
    )  # fmt: skip
    g.add_argument(
        "--num-processes", type=_positive(int), metavar="N",
        help="how many processes train together (default: $JAX_NUM_PROCESSES)",
    )  # fmt: skip
    g.add_argument(
        "--process-id", type=int, metavar="I",
        help="this process's index, 0 to N-1 (default: $JAX_PROCESS_ID)",
    )  # fmt: skip
    g.add_argument(
        "--cluster", choices=CLUSTERS,
        help="let jax read what is not given from the cluster's environment (slurm: srun's "
        "SLURM_* variables; ompi: mpirun's; mpi4py; auto: the first found)",
    )  # fmt: skip
    g = t.add_argument_group("instruments and private training")
    g.add_argument(
        "--instruments", action="store_true",
        help="every K-th step of each epoch (--instruments-every) also record, per layer, the "
        "gradient norm, update size and update/param ratio, δ norm, activation std, dead-ReLU "
        "fraction and per-example gradient-norm quantiles, and the gradient noise scale, from "
        "the step's own backward pass, into metrics.jsonl; report.md plots them",
    )  # fmt: skip
    g.add_argument(
        "--instruments-every", type=_positive(int), metavar="K",
        help="with --instruments: every K-th step of an epoch (default 16)",
    )  # fmt: skip
    g.add_argument(
        "--dp-clip", type=_positive(float), metavar="C",
        help="DP-SGD: clip each example's gradient to norm C (needs --dp-noise)",
    )  # fmt: skip
    g.add_argument(
        "--dp-noise", type=_nonnegative_float, metavar="SIGMA",
        help="DP-SGD: Gaussian noise of standard deviation SIGMA·C on the clipped sum (0: "
        "clipping only, ε = ∞); ε goes to privacy.json, metrics.jsonl and report.md",
    )  # fmt: skip
    g.add_argument(
        "--dp-delta", type=_delta, metavar="DELTA",
        help=f"DP-SGD: the δ of the (ε, δ) reported (default {DEFAULT_DP_DELTA})",
    )  # fmt: skip
    t.add_argument("--out", help="run folder (default runs/<dataset>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, with its saved settings",
    )  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    c = sub.add_parser(
        "check",
        help="cross-check the hand-written grads on random data (a net at perturbed params)",
        description="Cross-check the hand-written gradients against jax.grad and finite "
        "differences on random data. An --arch preset is sized for its data set (cnn, resmlp: "
        "digits; mnist1d_cnn: mnist1d). A net (--net, --arch, --sizes with --dropout) is checked "
        "at PERTURBED params: biases, γ, β and learned α shifted by 0.5·N(0, 1), random running "
        "statistics, because at init (b = 0, γ = 1, β = 0) some wrong rules give the right "
        "answer; an MLP at its init params.",
        raise_errors=raise_errors,
    )  # fmt: skip
    model_args(c, "784,16,16,10", CHECK_RESMLP)
    c.add_argument("--batch-size", type=_positive(int), default=32)
    c.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    c.add_argument(
        "--compute-dtype", choices=COMPUTE_DTYPES,
        help="check the mixed-precision gradients (params in --dtype, matmuls in this dtype)",
    )  # fmt: skip
    c.add_argument(
        "--mode", choices=("train", "eval"),
        help="nets with BatchNorm or Dropout: train (batch statistics, dropout masks from a "
        "key; the default) or eval (running statistics, no dropout)",
    )  # fmt: skip
    c.add_argument("--no-fd", action="store_true", help="skip the finite differences")

    r = sub.add_parser(
        "report",
        help="(re)build report.md of an fnbp train run folder from its files",
        description="Write report.md (and its figures) in an fnbp train run folder from its "
        "config.json, metrics.jsonl and privacy.json: the config, the final metrics, train loss "
        "and test accuracy per epoch, each layer's gradient norm, the instruments' figures. "
        "The run may be finished, interrupted or diverged.",
        raise_errors=raise_errors,
    )  # fmt: skip
    r.add_argument("run_dir", metavar="RUN_DIR", help="the run folder fnbp train wrote")
    return parser


def _load_dataset(args, sizes):
    """The data set of ``--dataset``; ``sizes`` (n₀, …, n_L) shape the teacher of
    teacher_student."""
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
    return data.teacher_student(jax.random.key(args.seed), sizes=(sizes[0], 32, sizes[-1]))


# ----------------------------------------------------------------------------------------------
# Choosing the net: --sizes (an MLP), --net FILE.json, --arch NAME


def _given(args, *names) -> list[str]:
    """The options among ``names`` (dests) given on the command line, as ``--option``."""
    flag = {"net_file": "--net"}
    return [flag.get(n, f"--{n.replace('_', '-')}") for n in names if getattr(args, n) is not None]


def _chosen(args) -> str:
    """How the net was chosen, for messages: ``--net FILE``, ``--arch cnn``, ``--sizes 64,10``."""
    if args.net_file is not None:
        return f"--net {args.net_file}"
    if args.arch is not None:
        return f"--arch {args.arch}"
    return f"--sizes {','.join(map(str, args.sizes))}"


def _check_net_options(args) -> None:
    """Refuse options that contradict each other in choosing the net (before anything runs)."""
    chosen = _given(args, "net_file", "sizes", "arch")
    if len(chosen) > 1:
        raise UsageError(
            f"{' and '.join(chosen)} both choose the net; give one of --sizes (an MLP), "
            "--net FILE.json or --arch NAME"
        )
    blocks = _given(args, "depth", "width", "norm", "alpha")
    if blocks and args.arch != "resmlp":
        net = _chosen(args) if args.arch or args.net_file else "an MLP (--sizes)"
        raise UsageError(
            f"{blocks[0]} sets the blocks of --arch resmlp, but the net is {net}; drop "
            f"{', '.join(blocks)} or use --arch resmlp"
        )
    if args.net_file is not None:
        own = _given(args, "activation", "output_activation", "loss", "dropout")
        if own:
            raise UsageError(
                f"--net {args.net_file} sets its own activations, loss and dropout layers; drop "
                f"{', '.join(own)} (or edit the file)"
            )


def _read_net(path: str):
    """The :class:`fnbp.Net` in the JSON file ``path``; a :class:`UsageError` naming the file
    (and the layer, for a bad layer) otherwise."""
    from fnbp.net import Net

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"--net {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"--net {path}: cannot read it ({why})") from None
    try:
        return Net.from_json(text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--net {path}: {e}") from None


def _build_model(args, features: int | None = None, outputs: int | None = None):
    """The :class:`fnbp.MLP` or :class:`fnbp.Net` that ``args`` choose; an ``--arch`` preset is
    sized for ``features`` inputs and ``outputs`` outputs (``None`` before the data is known).

    Resolves the defaults it uses into ``args`` (so config.json records them).
    """
    from fnbp import presets
    from fnbp.model import MLP

    if getattr(args, "net_spec", None) is not None:  # --resume: the net config.json recorded
        return args.net_spec
    if args.net_file is not None:
        return _read_net(args.net_file)
    args.activation = args.activation or "relu"
    args.output_activation = args.output_activation or "identity"
    options = {
        "activation": args.activation,
        "output_activation": args.output_activation,
        "loss": args.loss,
    }
    if args.arch is None:
        if args.dropout:
            try:
                return presets.mlp(args.sizes, **options, dropout=args.dropout)
            except ValueError as e:
                raise UsageError(f"{_chosen(args)} --dropout {args.dropout}: {e}") from None
        return MLP(args.sizes, args.activation, args.loss, args.output_activation)
    if features is None:
        return None
    args.dropout = args.dropout or 0.0
    if args.arch == "resmlp":
        args.depth = args.depth or args.resmlp_default["depth"]
        args.width = args.width or args.resmlp_default["width"]
        args.norm = args.norm or "none"
        args.alpha = 1 / math.sqrt(args.depth) if args.alpha is None else args.alpha
        options.update(depth=args.depth, width=args.width, norm=args.norm, alpha=args.alpha)
    try:
        return presets.PRESETS[args.arch](features, outputs, **options, dropout=args.dropout)
    except ValueError as e:
        raise UsageError(f"--arch {e}") from None  # the message starts with the preset's name


def _net_settings(args, model) -> dict:
    """The :data:`NET_SETTINGS` of a run (none for an MLP: its config.json stays as it was)."""
    from fnbp.net import Net

    if not isinstance(model, Net):
        return {}
    settings = {k: getattr(args, k, None) for k in NET_SETTINGS}
    settings["net"] = model.to_dict()
    if args.net_file is not None:
        settings["net_file"] = str(Path(args.net_file).resolve())
    return settings


def _shaped(model, ds, args):
    """``ds`` with its inputs reshaped to ``(N, *model.input_shape)``; a :class:`UsageError`
    naming both shapes when the model does not fit the data."""
    from fnbp.model import MLP

    if isinstance(model, MLP):
        sizes = model.sizes
        if ds.num_features != sizes[0] or ds.num_outputs != sizes[-1]:
            raise UsageError(
                f"--sizes {','.join(map(str, sizes))} does not fit dataset {args.dataset}: it has "
                f"{ds.num_features} features and {ds.num_outputs} outputs, so sizes must start "
                f"with {ds.num_features} and end with {ds.num_outputs}"
            )
        return ds
    shape, need = model.input_shape, math.prod(model.input_shape)
    if math.prod(ds.x_train.shape[1:]) != need:
        raise UsageError(
            f"{_chosen(args)}: the net's input_shape {shape} takes {need} features per "
            f"example, but dataset {args.dataset} has inputs of shape {tuple(ds.x_train.shape)}"
        )
    if ds.num_outputs != model.output_size:
        what = "classes" if ds.num_classes is not None else "targets"
        raise UsageError(
            f"{_chosen(args)}: the net has {model.output_size} outputs, but dataset "
            f"{args.dataset} has {ds.num_outputs} {what}"
        )
    return ds._replace(
        x_train=ds.x_train.reshape(len(ds.x_train), *shape),
        x_test=ds.x_test.reshape(len(ds.x_test), *shape),
    )


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
    kept = {"--resume", "--no-progress", *(f"--{k.replace('_', '-')}" for k in PROCESS_OPTIONS)}
    extra = sorted({t.split("=")[0] for t in argv if t.startswith("--")} - kept)
    if extra:
        raise UsageError(
            f"--resume continues a run with the settings saved in its config.json; drop "
            f"{', '.join(extra)}"
        )
    run = Path(args.resume)
    config_path = _run_config(run, f"--resume {run}", "an fnbp train run")
    try:
        config = json.loads(config_path.read_text())
        saved = {k: config[k] for k in TRAIN_SETTINGS}
        saved.update({k: config.get(k) for k in NET_SETTINGS})  # absent from an MLP run's
        saved.update({k: config.get(k) for k in VAL_SETTINGS})  # and from older runs' configs
        saved.update({k: config.get(k) for k in EXTRA_SETTINGS})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:  # fmt: skip
        raise UsageError(
            f"{config_path}: not an fnbp train config ({type(e).__name__}: {e})"
        ) from None
    rebuilt = ["train"]
    for k, v in saved.items():
        if v is None or v is False or k in ("net", "net_file"):  # the net: from its spec
            continue
        flag = f"--{k.replace('_', '-')}"
        if v is True:  # a switch (--instruments)
            rebuilt.append(flag)
        else:
            rebuilt += [flag, ",".join(map(str, v)) if k == "sizes" else str(v)]
    try:
        resumed = _parser(raise_errors=True).parse_args(rebuilt)
    except UsageError as e:
        raise UsageError(f"{config_path}: {e}") from None
    resumed.resume, resumed.no_progress = args.resume, args.no_progress
    for k in PROCESS_OPTIONS:
        setattr(resumed, k, getattr(args, k))
    resumed.net_file, resumed.net_spec = saved["net_file"], None
    if saved["net"] is not None:
        from fnbp.net import Net

        try:
            resumed.net_spec = Net.from_dict(saved["net"])
        except (ValueError, TypeError) as e:
            raise UsageError(f"{config_path}: net: {e}") from None
    return run, resumed


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line (NaN as null, ±inf as "inf"), replacing ``path`` atomically."""
    from fnbp.io import _atomic_write_bytes
    from fnbp.report import _jsonable

    text = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
    _atomic_write_bytes(path, text.encode())


def _train(args, argv) -> int:
    # Join first: jax's preemption notifier takes SIGTERM when it starts, the handlers take it back
    processes = _join(args)
    with _StopOnSignal() as stop:
        return _run_training(args, argv, stop, processes)


def _join(args) -> int:
    """Join the other processes that ``--coordinator``, ``--num-processes``, ``--process-id``,
    ``--cluster`` or their environment variables ask for (:func:`fnbp.distributed.initialize`),
    before anything uses JAX; returns the number of processes (1: none asked for).

    Raises:
        UsageError: naming the option or variable, for a bad or missing setting, or several
            processes without ``--out`` (or ``--resume``): each would pick its own default
            folder.
    """
    import jax

    from fnbp import distributed

    names = {k: f"--{k.replace('_', '-')}" for k in PROCESS_OPTIONS}
    given = [getattr(args, k) for k in PROCESS_OPTIONS[:3]]
    try:
        launch = distributed.resolve(*given, cluster=args.cluster, names=names)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if launch is None:
        return 1
    if args.resume is None and not args.out:
        raise UsageError(
            "several processes write one run folder: give --out FOLDER, the same on every "
            "process and one that all of them see (a shared file system)"
        )
    distributed.initialize(*given, cluster=args.cluster)
    return jax.process_count()


def _run_training(args, argv, stop: _StopOnSignal, processes: int = 1) -> int:
    import jax
    import optax

    from fnbp import checkpoint
    from fnbp.distributed import barrier, is_main
    from fnbp.initializers import init_params
    from fnbp.io import save_params
    from fnbp.model import MLP, init_state
    from fnbp.report import check_out, environment, read_jsonl, save_json
    from fnbp.train import Interrupted, NonFiniteError, data_mesh, fit

    resume = args.resume is not None
    if resume:
        out, args = _resumed(args, argv)
    else:
        _check_net_options(args)
    if args.devices is None:  # resolved, so config.json records it
        args.devices = 1 if processes == 1 else "all"
    if args.arch is None and args.net_file is None:
        args.sizes = args.sizes or _sizes(DEFAULT_SIZES[args.dataset])
    regression = args.dataset == "teacher_student"
    if args.net_file is None:  # a net file sets its own loss
        args.loss = args.loss or ("mse" if regression else "softmax_cross_entropy")
    model = _build_model(args)  # None for an --arch preset: it is sized for the data below
    if model is not None and not isinstance(model, MLP):
        args.loss = model.loss
    if regression and args.loss != "mse":
        raise UsageError(
            f"--dataset teacher_student is a regression task: use --loss mse, not {args.loss}"
            if args.net_file is None else
            f"--dataset teacher_student is a regression task, but --net {args.net_file} has "
            f"loss {args.loss}: it needs mse"
        )  # fmt: skip
    if model is not None and not isinstance(model, MLP):
        teacher = (math.prod(model.input_shape), model.output_size)
    else:
        teacher = args.sizes or _sizes(DEFAULT_SIZES["teacher_student"])
    if not resume:
        out = check_out(args.dataset, args.out, args.overwrite, root="runs")
    ds = _load_dataset(args, teacher)
    if model is None:
        model = _build_model(args, ds.num_features, ds.num_outputs)
    ds = _shaped(model, ds, args)
    net = not isinstance(model, MLP)
    if args.early_stopping is not None and args.val_fraction is None:
        args.val_fraction = DEFAULT_VAL_FRACTION  # resolved, so config.json records it
    ds, (x_val, y_val) = _hold_out(ds, args.val_fraction, args.seed)
    if args.batch_size > len(ds.x_train):
        held = "" if x_val is None else f" left after holding out {len(x_val)} for validation"
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {len(ds.x_train)} training examples{held}"
        )
    mesh = None
    if args.devices != 1 or processes > 1:
        try:
            mesh = data_mesh(args.devices)
        except ValueError as e:
            saved = f"{out / 'config.json'}: " if resume else ""
            raise UsageError(f"{saved}--devices {args.devices}: {e}") from None
        if args.batch_size % mesh.size:
            raise UsageError(
                f"--batch-size {args.batch_size} must be divisible by the {mesh.size} devices"
            )
    _check_extras(args, model)
    privacy = _Privacy.of(args, len(ds.x_train))
    # config.json's names for what metrics.jsonl's lists hold, the command, the examples trained on
    described = {"command": "fnbp " + shlex.join(argv), "n_train": len(ds.x_train)}
    if args.instruments:
        from fnbp.instruments import layer_names
        from fnbp.instruments.training import left_out

        described["instrument_layers"] = layer_names(model)
        if left_out(model):
            print(f"fnbp: --instruments: {left_out(model)}", file=sys.stderr)
    if privacy.on and privacy.delta >= 1 / privacy.n:
        print(
            f"fnbp: --dp-delta {privacy.delta:g} is not below 1/N = 1/{privacy.n}: a mechanism "
            "that publishes one example in full meets such a δ; choose δ well below 1/N",
            file=sys.stderr,
        )
    if args.optimizer == "sgd":
        optimizer = optax.sgd(args.lr, momentum=args.momentum or None)
    else:
        optimizer = optax.adam(args.lr)

    checkpoints = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    settings = {k: getattr(args, k) for k in (*TRAIN_SETTINGS, *VAL_SETTINGS, *EXTRA_SETTINGS)}
    settings.update(sizes=list(args.sizes) if args.sizes else None, loss=args.loss)
    settings.update(_net_settings(args, model))
    if args.data_dir:
        settings["data_dir"] = str(Path(args.data_dir).resolve())
    main = is_main()  # with several processes, process 0 alone writes the run folder
    barrier("fnbp train: checked")  # every process has checked --out before process 0 writes
    if resume:
        latest = checkpoint.latest_checkpoint(checkpoints)
        print(
            f"resuming {out} from {latest.name}" if latest else
            f"resuming {out}: no checkpoint yet, starting from the beginning",
            file=sys.stderr,
        )  # fmt: skip
        records = read_jsonl(metrics_path)
    elif main:  # arguments are good: only now is anything written
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
        if args.overwrite:  # an earlier run's checkpoints and params would be taken for ours
            for old in checkpoint.list_checkpoints(checkpoints):
                old.unlink()
            (out / "params.npz").unlink(missing_ok=True)
        layout = {"processes": processes} if processes > 1 else {}
        save_json(out / "config.json",
                  {**settings, "out": str(out), **described, **layout, **environment()})  # fmt: skip
        records = []
        _write_jsonl(metrics_path, records)
    else:
        records = []
    barrier("fnbp train: run folder")  # ... and the others read it only once it is written

    def log(record):
        nonlocal records  # a resumed run replaces the records its predecessor wrote past its checkpoint
        records = [r for r in records if r["epoch"] < record["epoch"]] + [privacy.mark(record)]
        if main:
            _write_jsonl(metrics_path, records)

    def report():  # report.md (and privacy.json) from the epochs logged so far
        if main:
            _write_report(out, records, privacy)

    key = jax.random.key(args.seed)
    k_init, k_data = jax.random.split(key)
    params = init_params(k_init, model, args.init)
    state = {"state": init_state(model)} if net else {}  # fit returns it beside the params
    try:
        params, *state_out, _, history = fit(
            model, optimizer, params, ds.x_train, ds.y_train, **state,
            key=k_data, epochs=args.epochs, batch_size=args.batch_size, grads=args.grads,
            l2=args.l2, compute_dtype=_compute_dtype(args.compute_dtype), x_test=ds.x_test,
            y_test=ds.y_test, x_val=x_val, y_val=y_val, early_stopping=args.early_stopping,
            on_nonfinite=args.on_nonfinite, instruments=args.instruments_every,
            dp_clip=args.dp_clip, dp_noise=args.dp_noise, checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every, resume=resume,
            config=settings, mesh=mesh, should_stop=stop, progress=not args.no_progress,
            on_epoch=log,
        )  # fmt: skip
    except Interrupted as e:
        report()
        signum = stop.signum or signal.SIGINT
        why = signal.Signals(signum).name
        if stop.signum is None and processes > 1:  # they all stop when one is asked to
            why = "another process was signalled"
        every = " in every process, with its process options" if processes > 1 else ""
        print(
            f"fnbp: {why}: stopped after step {e.step}; checkpoint {e.checkpoint}; continue "
            f"with: fnbp train --resume {out}{every}",
            file=sys.stderr,
        )
        return 128 + signum
    except NonFiniteError:
        report()  # the gradient flow up to the last finished epoch: what a diverged run needs
        raise
    records = [privacy.mark(r) for r in history]
    if main:
        _write_jsonl(metrics_path, records)
        # params.npz: a net's state beside its params; with --early-stopping the best epoch's
        save_params(out / "params.npz", params, model, *state_out)
    report()
    print(_summary(history, args.early_stopping, args.epochs))
    if privacy.on:
        print(privacy.summary(records[-1]["step"]))
    print(f"report: {out / 'report.md'}")
    print(f"run folder: {out}")
    return 0


def _check_extras(args, model) -> None:
    """Check (and resolve into ``args``) the options of the instruments and of DP-SGD, before
    anything is written: a :class:`UsageError` naming the flag otherwise."""
    from fnbp.instruments.training import DEFAULT_EVERY

    if args.instruments_every is not None and not args.instruments:
        raise UsageError(
            f"--instruments-every {args.instruments_every} sets how often --instruments records; "
            "add --instruments"
        )
    if args.instruments:
        args.instruments_every = args.instruments_every or DEFAULT_EVERY
        if args.grads != "manual":
            raise UsageError(
                f"--instruments reads the hand-written backward pass's a and δ; drop --grads "
                f"{args.grads}"
            )
    dp = _given(args, "dp_clip", "dp_noise", "dp_delta")
    if not dp:
        return
    if args.dp_clip is None or args.dp_noise is None:
        missing = "--dp-clip C" if args.dp_clip is None else "--dp-noise SIGMA"
        raise UsageError(
            f"{' and '.join(dp)} without {missing.split()[0]}: DP-SGD needs both the clip norm "
            f"and the noise multiplier; add {missing} (--dp-noise 0: clipping only, no privacy)"
        )
    args.dp_delta = DEFAULT_DP_DELTA if args.dp_delta is None else args.dp_delta
    clash = [f"--grads {args.grads}"] if args.grads != "manual" else []
    clash += [f"--compute-dtype {args.compute_dtype}"] if args.compute_dtype != "float32" else []
    clash += ["--instruments"] if args.instruments else []
    if clash:
        raise UsageError(
            f"--dp-clip clips each example's gradient from the hand-written float32 backward "
            f"pass (with no instruments, yet); drop {', '.join(clash)}"
        )
    if model.couples_examples:
        layer = model.find(lambda l: l.couples_examples)
        raise UsageError(
            f"--dp-clip: {_chosen(args)} has a {layer} that couples the examples of a batch in "
            "train mode, so no per-example gradient exists to clip; use a net without "
            "BatchNorm (e.g. --norm layer)"
        )


class _Privacy:
    """DP-SGD's accounting for one run (``on`` False without ``--dp-clip``): ε after a number
    of steps by :func:`fnbp.instruments.privacy.epsilon` (RDP), for sampling rate B/N."""

    ACCOUNTANT = "rdp"
    SAMPLING = (
        "ε is the accountant's for Poisson sampling (each example in a step's batch with "
        "probability q = batch size / training examples, independently); this run drew "
        "shuffled batches of fixed size (each epoch a permutation), which is not Poisson "
        "sampling, so, as in Opacus's and TF-Privacy's reports, the ε is the usual "
        "approximation, not a proven guarantee for this sampler. Only the training examples "
        "are accounted for (not the validation or test sets, nor the hyper-parameters)."
    )

    def __init__(self, clip, noise, delta, batch, n):
        self.on = clip is not None
        self.clip, self.noise, self.delta, self.batch, self.n = clip, noise, delta, batch, n

    @classmethod
    def of(cls, args, n_train: int) -> _Privacy:
        return cls(args.dp_clip, args.dp_noise, args.dp_delta, args.batch_size, n_train)

    @property
    def rate(self) -> float:
        return self.batch / self.n

    def epsilon(self, steps: int) -> float:
        from fnbp.instruments.privacy import epsilon

        return epsilon(self.noise, self.rate, steps, self.delta, accountant=self.ACCOUNTANT)

    def mark(self, record: dict) -> dict:
        """``record`` with ``dp_epsilon``, ε after its ``step`` steps (a copy; as given when
        off)."""
        if not self.on:
            return record
        return {**record, "dp_epsilon": self.epsilon(record["step"])}

    def accounting(self, steps: int) -> dict:
        """Everything ε depends on, for privacy.json."""
        return {
            "epsilon": self.epsilon(steps), "delta": self.delta,
            "accountant": f"dp-accounting {self.ACCOUNTANT.upper()} (Rényi DP)",
            "noise_multiplier": self.noise, "clip_norm": self.clip,
            "sampling_rate": self.rate, "batch_size": self.batch, "n_train": self.n,
            "steps": steps, "sampling": self.SAMPLING,
        }  # fmt: skip

    def summary(self, steps: int) -> str:
        eps = self.epsilon(steps)
        return (
            f"DP-SGD: ε = {eps:.4g} at δ = {self.delta:g} (RDP accountant; σ = {self.noise:g}, "
            f"C = {self.clip:g}, sampling rate {self.batch}/{self.n} = {self.rate:.4g}, {steps} "
            "steps); ε assumes Poisson sampling, these batches are shuffled and of fixed size "
            "(see privacy.json)"
        )


def _write_report(out: Path, records: list[dict], privacy: _Privacy) -> None:
    """With DP-SGD ``privacy.json`` (ε after the steps logged so far), then ``report.md`` from
    the run folder's files (:func:`fnbp.report.train_report`)."""
    from fnbp.report import save_json, train_report

    if privacy.on:
        save_json(out / "privacy.json", privacy.accounting(records[-1]["step"] if records else 0))
    train_report(out)


def _run_config(run: Path, name: str, what: str) -> Path:
    """The path of run folder ``run``'s config.json; a :class:`UsageError` starting with
    ``name`` when the folder or its config.json is missing."""
    if not run.is_dir():
        raise UsageError(f"{name}: no such run folder")
    if not (run / "config.json").is_file():
        raise UsageError(f"{name}: it has no config.json, so it is not {what}")
    return run / "config.json"


def _report(args) -> int:
    """``fnbp report RUN_DIR``: privacy.json again for a DP-SGD run (ε at the last logged step),
    then report.md."""
    from fnbp.report import read_jsonl, train_report

    run = Path(args.run_dir)
    config_path = _run_config(run, str(run), "an fnbp train run folder")
    try:
        config = json.loads(config_path.read_text())
        dp = config.get("dp_clip") is not None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UsageError(
            f"{config_path}: not an fnbp train config ({type(e).__name__}: {e})"
        ) from None
    if dp and config.get("n_train") is not None:  # configs written before n_train keep privacy.json
        records = read_jsonl(run / "metrics.jsonl")
        privacy = _Privacy(config["dp_clip"], config["dp_noise"], config["dp_delta"],
                           config["batch_size"], config["n_train"])  # fmt: skip
        _write_report(run, records, privacy)
    else:
        train_report(run)
    print(f"report: {run / 'report.md'}")
    return 0


def _hold_out(ds, fraction: float | None, seed: int) -> tuple:
    """``(ds, (x_val, y_val))``: ``round(fraction · N)`` of the ``N`` training examples, drawn by
    a permutation seeded by ``seed``, held out as a validation set, the rest left in
    ``ds.x_train, ds.y_train`` (both in their original order); ``(ds, (None, None))`` without
    a ``fraction``.

    Raises:
        UsageError: if the fraction holds out no example, or leaves none to train on.
    """
    import numpy as np

    if fraction is None:
        return ds, (None, None)
    n = len(ds.x_train)
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        what = "no validation examples" if n_val == 0 else "every one for validation"
        raise UsageError(
            f"--val-fraction {fraction} of the {n} training examples holds out {what}; "
            "choose a fraction that leaves some of each"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    rest = ds._replace(x_train=ds.x_train[train], y_train=ds.y_train[train])
    return rest, (ds.x_train[val], ds.y_train[val])


def _summary(history: list[dict], early_stopping: int | None, epochs: int) -> str:
    """The line ``fnbp train`` ends with: the test accuracy (or loss) of the params it saved,
    the last epoch's or, with early stopping, the best epoch's."""
    final = history[-1]
    kept, when = final, f"{epochs} epochs"
    if early_stopping is not None:
        best = final["best_epoch"]
        if best == 0:
            return (
                f"early stopping after {final['epoch']} epochs kept the initial params: no epoch "
                "had a finite validation loss"
            )
        kept, when = history[best - 1], f"epoch {best} of {final['epoch']}, kept by early stopping"
    ran = f"({when}, {final['seconds']:.1f} s)"
    if "test_accuracy" in kept:
        return f"final test accuracy: {kept['test_accuracy']:.4f}  {ran}"
    return f"final test loss: {kept['test_loss']:.6f}  {ran}"


def _compute_dtype(name: str | None):
    """``None`` for float32 (compute in the params' dtype), else the jnp dtype."""
    import jax.numpy as jnp

    return None if name in (None, "float32") else jnp.dtype(name)


def _perturbed(key, net, scheme, dtype, scale: float = 0.5):
    """``(params, state)`` for ``net`` away from the values at init that hide bugs: the init
    scheme's draw with ``scale``·N(0, 1) added to every leaf that starts at a constant (biases,
    γ, β, a learned α); running means ``scale``·N(0, 1), variances exp(``scale``·N(0, 1))."""
    import jax
    import jax.numpy as jnp

    from fnbp.initializers import init_params
    from fnbp.model import init_state

    k_init, k_p, k_s = jax.random.split(key, 3)
    state_dtype = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32

    def keyed(fn, tree, k):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        ks = jax.random.split(k, max(len(leaves), 1))
        return jax.tree_util.tree_unflatten(
            treedef, [fn(path[-1].key, v, ki) for (path, v), ki in zip(leaves, ks, strict=False)]
        )

    def shift(name, v, k):  # W and P keep their draw
        return v if name in ("W", "P") else v + scale * jax.random.normal(k, v.shape, v.dtype)

    def stats(name, v, k):
        n = scale * jax.random.normal(k, v.shape, state_dtype)
        return jnp.exp(n) if name == "var" else n

    params = keyed(shift, init_params(k_init, net, scheme, dtype=dtype), k_p)
    return params, keyed(stats, init_state(net), k_s)


def _check(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fnbp.crosscheck import crosscheck
    from fnbp.initializers import init_params
    from fnbp.model import MLP

    _check_net_options(args)
    if args.arch is None and args.net_file is None:
        args.sizes = args.sizes or _sizes("784,16,16,10")
    args.loss = args.loss or "softmax_cross_entropy"
    model = _build_model(args, *CHECK_SIZES.get(args.arch, (None, None)))
    dtype = {"float32": jnp.float32, "float64": np.float64, "bfloat16": jnp.bfloat16}[args.dtype]
    mlp = isinstance(model, MLP)
    with jax.enable_x64(args.dtype == "float64"):
        k_p, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
        if mlp:
            params, modes = init_params(k_p, model, args.init, dtype=dtype), {}
        else:
            params, state = _perturbed(k_p, model, args.init, dtype)
            train = (args.mode or "train") == "train"
            modes = {
                "state": state if model.needs_state else None,
                "train": train,
                "key": jax.random.fold_in(k_p, 1) if train else None,  # dropout's masks
            }
        x = jax.random.normal(k_x, (args.batch_size, *model.input_shape), dtype)
        n_out = model.output_size
        if model.loss == "softmax_cross_entropy":
            y = jax.random.randint(k_y, (args.batch_size,), 0, n_out)
        elif model.loss == "sigmoid_binary_cross_entropy":
            y = jax.random.bernoulli(k_y, 0.5, (args.batch_size, n_out)).astype(dtype)
        else:
            y = jax.random.normal(k_y, (args.batch_size, n_out), dtype)
        report = crosscheck(
            params, model, x, y, l2=args.l2, finite_differences=not args.no_fd,
            compute_dtype=_compute_dtype(args.compute_dtype), **modes,
        )  # fmt: skip
    if not mlp:
        print(
            "params perturbed from init (biases, γ, β and learned α + 0.5·N(0, 1); random "
            "running statistics): b = 0, γ = 1, β = 0 hide some wrong rules"
        )
    print(report)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fnbp`` console script."""
    from fnbp.train import NonFiniteError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
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
