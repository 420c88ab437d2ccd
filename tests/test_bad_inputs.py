"""A catalogue of bad inputs across the API, the data loaders and the command line.

Each row is one bad input and the answer it must get: the exception type and a piece of its
message (API and loaders), or exit code 2 and a single ``… error: …`` line on stderr naming
the problem (command line), never a traceback. Every row runs in its own folder, which holds
an earlier run, a params file and MNIST folders (good and malformed) that the row may point
at; afterwards the folder must hold exactly the same files with the same bytes: nothing
written, nothing overwritten.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import idx_bytes, write_mnist

import fnbp
from fnbp import checkpoint, data, train
from fnbp.cli import main

MODEL = fnbp.MLP((4, 6, 3))
REGRESSOR = fnbp.MLP((4, 6, 2), "tanh", "mse")


def _params(model=MODEL):
    return fnbp.init_params(jax.random.key(0), model)


X = jax.random.normal(jax.random.key(1), (5, 4))
Y = jnp.array([0, 1, 2, 1, 0])


def _fit(x=X, y=Y, model=MODEL, **kwargs):
    args = {"key": jax.random.key(0), "epochs": 1, "batch_size": 2, "progress": False, **kwargs}
    return train.fit(model, optax.sgd(0.1), _params(model), x, y, **args)


def _with(v, index, value):
    v = np.array(v, np.float32)
    v[index] = value
    return v


def _net_json(layers, input_shape=64) -> str:
    return json.dumps({"kind": "net", "input_shape": input_shape, "layers": layers})


DENSE10 = {"kind": "dense", "features": 10}
NET_FILES = {  # --net files for the command-line rows
    "net.json": fnbp.Net(64, [fnbp.layers.Dense(8, "relu"), fnbp.layers.Dense(10)]).to_json(),
    "net-40-inputs.json": _net_json([DENSE10], 40),
    "net-3-outputs.json": _net_json([{"kind": "dense", "features": 3}]),
    "net-not-json.json": '{"kind": "net", "layers": [',
    "net-unknown-kind.json": _net_json([DENSE10, {"kind": "attention", "heads": 2}]),
    "net-unknown-field.json": _net_json([{"kind": "dense", "features": 8, "widht": 3}, DENSE10]),
    "net-zero-features.json": _net_json([{"kind": "dense", "features": 0}, DENSE10]),
    "net-bad-stride.json": _net_json(
        [{"kind": "reshape", "shape": [8, 8, 1]},
         {"kind": "conv", "features": 4, "kernel_size": [3, 3], "strides": 0},
         {"kind": "flatten"}, DENSE10]),
}  # fmt: skip


@pytest.fixture
def world(tmp_path, monkeypatch):
    """The folder every row runs in: an earlier run, a params file, MNIST folders."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "notes.txt").write_text("precious\n")
    fnbp.save_params(tmp_path / "params.npz", _params(), MODEL)
    (tmp_path / "a-file").write_text("not a folder\n")
    write_mnist(tmp_path / "mnist-ok")
    bad_magic = write_mnist(tmp_path / "mnist-bad-magic")
    (bad_magic / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01" + bytes(16))
    nan = write_mnist(tmp_path / "mnist-nan")
    images = np.full((12, 28, 28), 0.5, np.float32)
    images[3, 5, 5] = np.nan
    (nan / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x0D, ">f4"))
    empty = write_mnist(tmp_path / "mnist-empty")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shape = (0, 28, 28) if "images" in name else (0,)
        (empty / name).write_bytes(idx_bytes(np.zeros(shape, np.uint8)))
    label10 = write_mnist(tmp_path / "mnist-label-10")
    (label10 / "t10k-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.array([0, 1, 2, 3, 4, 10], np.uint8))
    )
    write_mnist(tmp_path / "mnist-missing-file")
    (tmp_path / "mnist-missing-file" / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + bytes(60))
    for name, text in NET_FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Nets: a net with BatchNorm, Dropout and a residual branch, its params and state.

L = fnbp.layers
NET = fnbp.Net(4, [L.Dense(6, "relu"), L.BatchNorm(), L.Dropout(0.5),
                   L.Residual((L.Dense(6, "tanh"), L.Dropout(0.2))), L.Dense(3)])  # fmt: skip
CNN = fnbp.Net((4, 4, 1), [L.Conv(2, (3, 3)), L.Flatten(), L.Dense(3)])
DROPOUT = fnbp.Net(4, [L.Dense(3), L.Dropout(0.5), L.Dense(3)])
BRANCH = fnbp.Net(4, [L.Residual((L.Dense(4), L.Dropout(0.3))), L.Dense(3)])  # dropout inside


def _net(layers, input_shape=4, loss="softmax_cross_entropy"):
    return fnbp.Net(input_shape, layers, loss)


def _np(net=NET):
    return fnbp.init_params(jax.random.key(0, impl="rbg"), net)  # rbg: cheap to compile


def _replace(tree, index, value):
    return [value if i == index else t for i, t in enumerate(tree)]


def _eval(call, params=None, state=None, **kwargs):
    """``call(params, NET, X, Y, ...)`` in eval mode with NET's params and state by default."""
    params = _np() if params is None else params
    state = fnbp.init_state(NET) if state is None else state
    return call(params, NET, X, Y, state=state, train=False, **kwargs)


def _from_file(w, name):
    return fnbp.Net.from_json((w / name).read_text())


# ----------------------------------------------------------------------------------------------
# The API and the data loaders: (row id, call, exception type, message piece)

API = [
    ("mlp-one-size", lambda w: fnbp.MLP((4,)), ValueError, "at least two entries"),
    ("mlp-zero-width", lambda w: fnbp.MLP((4, 0, 3)), ValueError, "positive int"),
    ("mlp-sizes-string", lambda w: fnbp.MLP("4,3"), TypeError, "sequence of ints"),
    ("mlp-unknown-activation", lambda w: fnbp.MLP((4, 3), "swish"), ValueError,
     "unknown activation 'swish'; expected one of"),
    ("mlp-unknown-loss", lambda w: fnbp.MLP((4, 3), loss="hinge"), ValueError,
     "unknown loss 'hinge'"),
    ("mlp-squashed-logits", lambda w: fnbp.MLP((4, 3), output_activation="sigmoid"),
     ValueError, "output_activation must be 'identity'"),
    ("init-unknown-scheme", lambda w: fnbp.init_params(jax.random.key(0), MODEL, "xavier"),
     ValueError, "unknown init scheme 'xavier'"),
    ("init-int-key", lambda w: fnbp.init_params(0, MODEL), TypeError,
     "key must be a single JAX PRNG key"),
    ("init-int-dtype", lambda w: fnbp.init_params(jax.random.key(0), MODEL, dtype=jnp.int32),
     TypeError, "floating dtype"),
    ("init-negative-std", lambda w: fnbp.normal_scheme(-1.0), ValueError,
     "std must be a finite number > 0"),
    ("x-wrong-width", lambda w: fnbp.forward(_params(), MODEL, X[:, :3]), ValueError,
     "x must have shape (batch, 4)"),
    ("x-wrong-rank", lambda w: fnbp.forward(_params(), MODEL, X[None]), ValueError,
     "x must have shape (batch, 4)"),
    ("x-int-dtype", lambda w: fnbp.forward(_params(), MODEL, jnp.ones((5, 4), jnp.int32)),
     TypeError, "x must be a floating array"),
    ("x-not-an-array", lambda w: fnbp.forward(_params(), MODEL, [[0.0] * 4]), TypeError,
     "x must be an array"),
    ("label-out-of-range", lambda w: fnbp.loss(_params(), MODEL, X, Y.at[2].set(3)),
     ValueError, "labels must lie in [0, 3)"),
    ("label-negative", lambda w: fnbp.backprop(_params(), MODEL, X, Y.at[0].set(-1)),
     ValueError, "class labels in [-1, 2]"),
    ("y-wrong-rows", lambda w: fnbp.loss(_params(), MODEL, X, Y[:4]), ValueError,
     "y must have 5 rows"),
    ("y-wrong-width", lambda w: fnbp.loss(_params(), MODEL, X, jnp.ones((5, 4))), ValueError,
     "has 3 outputs"),
    ("params-missing-layer", lambda w: fnbp.backprop(_params()[:1], MODEL, X, Y), ValueError,
     "params has 1 layers but the model sizes (4, 6, 3) need 2"),
    ("params-transposed-W", lambda w: fnbp.backprop(
        [dict(_params()[0], W=_params()[0]["W"].T), _params()[1]], MODEL, X, Y),
     ValueError, "params[0]['W'] (layer 1) must have shape (6, 4)"),
    ("params-int-dtype", lambda w: fnbp.backprop(
        [{k: v.astype(jnp.int32) for k, v in p.items()} for p in _params()], MODEL, X, Y),
     TypeError, "must be a floating array"),
    ("l2-negative", lambda w: fnbp.backprop(_params(), MODEL, X, Y, l2=-0.1), ValueError,
     "l2 must be a finite number >= 0"),
    ("l2-nan", lambda w: fnbp.loss(_params(), MODEL, X, Y, l2=math.nan), ValueError,
     "l2 must be a finite number >= 0"),
    ("optimizer-not-optax", lambda w: fnbp.make_train_step(MODEL, "sgd"), TypeError,
     "optimizer must be an optax.GradientTransformation"),
    ("grads-unknown", lambda w: fnbp.make_train_step(MODEL, optax.sgd(0.1), grads="numeric"),
     ValueError, "grads must be one of"),
    ("epochs-zero", lambda w: _fit(epochs=0), ValueError, "epochs must be a positive int"),
    ("batch-size-zero", lambda w: _fit(batch_size=0), ValueError,
     "batch_size must be a positive int"),
    ("batch-size-over-n", lambda w: _fit(batch_size=6), ValueError,
     "batch_size 6 exceeds the 5 training examples"),
    ("fit-nan-x", lambda w: _fit(x=_with(X, (1, 2), np.nan)), ValueError,
     "x_train holds 1 NaN or Inf values (rows [1])"),
    ("fit-inf-targets", lambda w: _fit(y=_with(np.zeros((5, 2)), (4, 0), np.inf),
                                       model=REGRESSOR),
     ValueError, "y_train holds 1 NaN or Inf values (rows [4])"),
    ("fit-empty", lambda w: _fit(x=X[:0], y=Y[:0]), ValueError, "x_train is empty"),
    ("fit-nan-test-data", lambda w: _fit(x_test=_with(X, 0, np.inf), y_test=Y), ValueError,
     "x_test holds 4 NaN or Inf values"),
    ("fit-early-stopping-without-val", lambda w: _fit(early_stopping=2), ValueError,
     "early_stopping=2 watches the validation loss: pass x_val and y_val"),
    ("fit-early-stopping-zero", lambda w: _fit(x_val=X, y_val=Y, early_stopping=0), ValueError,
     "early_stopping must be a positive int, got 0"),
    ("fit-early-stopping-bool", lambda w: _fit(x_val=X, y_val=Y, early_stopping=True),
     ValueError, "early_stopping must be a positive int, got True"),
    ("fit-early-stopping-float", lambda w: _fit(x_val=X, y_val=Y, early_stopping=2.0),
     ValueError, "early_stopping must be a positive int, got 2.0"),
    ("fit-restore-best-not-a-bool", lambda w: _fit(x_val=X, y_val=Y, early_stopping=2,
                                                   restore_best="yes"),
     TypeError, "restore_best must be True or False, got 'yes'"),
    ("fit-x-val-without-y-val", lambda w: _fit(x_val=X), ValueError,
     "x_val is given without y_val: pass both or neither"),
    ("fit-y-val-without-x-val", lambda w: _fit(y_val=Y, early_stopping=2), ValueError,
     "y_val is given without x_val: pass both or neither"),
    ("fit-x-val-wrong-width", lambda w: _fit(x_val=X[:, :3], y_val=Y), ValueError,
     "x_val, y_val: x must have shape (batch, 4) for model sizes (4, 6, 3), got (5, 3)"),
    ("fit-y-val-wrong-rows", lambda w: _fit(x_val=X, y_val=Y[:4]), ValueError,
     "x_val, y_val: y must have 5 rows"),
    ("fit-y-val-label-out-of-range", lambda w: _fit(x_val=X, y_val=Y.at[1].set(3)), ValueError,
     "x_val, y_val: y holds class labels in [0, 3] but the model has 3 outputs"),
    ("fit-nan-val-data", lambda w: _fit(x_val=_with(X, (2, 1), np.nan), y_val=Y), ValueError,
     "x_val holds 1 NaN or Inf values (rows [2])"),
    ("fit-empty-val", lambda w: _fit(x_val=X[:0], y_val=Y[:0], early_stopping=1), ValueError,
     "x_val is empty"),
    ("compute-dtype-int", lambda w: fnbp.backprop(_params(), MODEL, X, Y, compute_dtype=jnp.int8),
     TypeError, "compute_dtype must be a floating dtype"),
    ("fit-unknown-guard", lambda w: _fit(on_nonfinite="ignore"), ValueError,
     "on_nonfinite must be one of ('stop', 'skip')"),
    # instruments in training and DP-SGD
    ("fit-instruments-zero", lambda w: _fit(instruments=0), ValueError,
     "instruments must be a positive int K (every K-th step), got 0"),
    ("fit-instruments-bool", lambda w: _fit(instruments=True), TypeError,
     "instruments must be None or a positive int K (instrument every K-th step), got True"),
    ("fit-instruments-autodiff", lambda w: _fit(instruments=4, grads="autodiff"), ValueError,
     "instruments=4 read the hand-written backward pass's a and δ, so they need "
     "grads='manual'"),
    ("step-instruments-int", lambda w: fnbp.make_train_step(MODEL, optax.sgd(0.1),
                                                            instruments=16),
     TypeError, "instruments must be True or False, got 16"),
    ("fit-dp-clip-without-noise", lambda w: _fit(dp_clip=1.0), ValueError,
     "dp_clip is given without dp_noise: DP-SGD needs both"),
    ("fit-dp-noise-without-clip", lambda w: _fit(dp_noise=1.0), ValueError,
     "dp_noise is given without dp_clip"),
    ("fit-dp-clip-zero", lambda w: _fit(dp_clip=0.0, dp_noise=1.0), ValueError,
     "dp_clip must be a finite number > 0, got 0.0"),
    ("fit-dp-noise-negative", lambda w: _fit(dp_clip=1.0, dp_noise=-1.0), ValueError,
     "dp_noise must be a finite number >= 0, got -1.0"),
    ("fit-dp-clip-string", lambda w: _fit(dp_clip="1", dp_noise=1.0), TypeError,
     "dp_clip must be a finite number > 0, got '1'"),
    ("fit-dp-autodiff", lambda w: _fit(dp_clip=1.0, dp_noise=1.0, grads="autodiff"),
     ValueError, "dp_clip=1.0 clips each example's gradient from the hand-written backward "
                 "pass's factors, so it needs grads='manual'"),
    ("step-dp-bfloat16", lambda w: fnbp.make_train_step(MODEL, optax.sgd(0.1), dp_clip=1.0,
                                                        dp_noise=1.0, compute_dtype=jnp.bfloat16),
     ValueError, "DP-SGD's step computes in the params' dtype; leave compute_dtype unset"),
    ("epoch-dp-with-instruments", lambda w: fnbp.make_train_epoch(
        MODEL, optax.sgd(0.1), batch_size=2, instruments=4, dp_clip=1.0, dp_noise=1.0),
     ValueError, "dp_clip=1.0 and instruments=4 do not go together"),
    ("population-dp-batchnorm", lambda w: fnbp.make_population_epoch(
        NET, optax.sgd(0.1), batch_size=2, dp_clip=1.0, dp_noise=1.0),
     ValueError, "dp_clip=1.0 (DP-SGD): the net's layer 2 (batch_norm) couples the examples"),
    ("fit-checkpoint-folder-in-use", lambda w: (
        _fit(checkpoint_dir=w / "ckpt"), _fit(checkpoint_dir=w / "ckpt")), ValueError,
     "already holds checkpoints"),
    ("crosscheck-bad-step", lambda w: fnbp.crosscheck(_params(), MODEL, X, Y, fd_step=0.0),
     ValueError, "fd_step must be a number in (0, 1)"),
    ("mesh-too-many-devices", lambda w: train.data_mesh(len(jax.devices()) + 1), ValueError,
     "devices must be 1 to"),
    ("save-params-mismatched", lambda w: fnbp.save_params(w / "params.npz", _params()[:1],
                                                         MODEL),
     ValueError, "params has 1 layers"),
    ("save-params-missing-folder", lambda w: fnbp.save_params(w / "no" / "p.npz", _params(),
                                                             MODEL),
     FileNotFoundError, "No such file or directory"),
    ("load-params-junk", lambda w: fnbp.load_params(w / "junk.npz"), ValueError,
     "junk.npz: not a valid fnbp params file"),
    ("load-checkpoint-junk", lambda w: checkpoint.load_checkpoint(w / "junk.npz",
                                                                  optax.sgd(0.1)),
     ValueError, "junk.npz: not a readable fnbp checkpoint"),
    ("load-checkpoint-params-file", lambda w: checkpoint.load_checkpoint(w / "params.npz",
                                                                         optax.sgd(0.1)),
     ValueError, "params.npz: not a readable fnbp checkpoint"),
    # data loaders
    ("digits-test-fraction", lambda w: data.load_digits(test_fraction=1.5), ValueError,
     "test_fraction must lie in (0, 1)"),
    ("digits-unknown-scale", lambda w: data.load_digits(scale="minmax"), ValueError,
     "scale must be 'standardize' or 'unit'"),
    ("mnist1d-too-few", lambda w: data.load_mnist1d(num_samples=5), ValueError,
     "num_samples must be >= 20"),
    ("teacher-student-noise", lambda w: data.teacher_student(jax.random.key(0), noise=-1.0),
     ValueError, "noise must be >= 0"),
    ("teacher-student-empty", lambda w: data.teacher_student(jax.random.key(0), n_train=0),
     ValueError, "n_train and n_test must be >= 1"),
    ("mnist-missing-folder", lambda w: data.load_mnist(w / "nowhere"), FileNotFoundError,
     "does not exist"),
    ("mnist-missing-file", lambda w: data.load_mnist(w / "mnist-missing-file"),
     FileNotFoundError, "lacks t10k-images-idx3-ubyte[.gz]"),
    ("mnist-bad-magic", lambda w: data.load_mnist(w / "mnist-bad-magic"), ValueError,
     "train-labels-idx1-ubyte: not an IDX file (bad magic number"),
    ("mnist-nan-pixels", lambda w: data.load_mnist(w / "mnist-nan"), ValueError,
     "mnist-nan/train-images-idx3-ubyte: holds 1 NaN or Inf values"),
    ("mnist-empty", lambda w: data.load_mnist(w / "mnist-empty"), ValueError,
     "mnist-empty/train-images-idx3-ubyte: holds no examples"),
    ("mnist-label-10", lambda w: data.load_mnist(w / "mnist-label-10"), ValueError,
     "labels must lie in 0..9"),
    ("batches-mismatched-rows", lambda w: list(data.batches(jax.random.key(0), X, Y[:4], 2)),
     ValueError, "x has 5 rows but y has 4"),
    ("epoch-batches-over-n", lambda w: data.epoch_batches(jax.random.key(0), X, Y, 6),
     ValueError, "batch_size 6 exceeds the 5 examples"),
    # nets: every layer kind's bad fields, named by layer (1-based) and kind
    ("net-dense-zero-features", lambda w: _net([L.Dense(0)]), L.LayerError,
     "Net: layer 1 (dense): features must be a positive int, got 0"),
    ("net-conv-negative-features", lambda w: _net([L.Conv(-2, (3,)), L.Flatten(), L.Dense(2)],
                                                  (8, 1)),
     L.LayerError, "layer 1 (conv): features must be a positive int, got -2"),
    ("net-conv-zero-kernel", lambda w: _net([L.Conv(2, (0,)), L.Flatten(), L.Dense(2)], (8, 1)),
     L.LayerError,
     "layer 1 (conv): kernel_size must be a positive int or a tuple of them, got (0,)"),
    ("net-conv-3d-kernel", lambda w: _net([L.Conv(2, (3, 3, 3)), L.Flatten(), L.Dense(2)], (8, 1)),
     L.LayerError, "layer 1 (conv): kernel_size must be a tuple of 1 (1-D) or 2 (2-D) positive "
                   "ints, got (3, 3, 3)"),
    ("net-conv-strides-length", lambda w: _net([L.Conv(2, (3, 3), (1, 2, 1)), L.Flatten(),
                                                L.Dense(2)], (4, 4, 1)),
     L.LayerError, "layer 1 (conv): strides must have 2 entries, got (1, 2, 1)"),
    ("net-conv-unknown-padding", lambda w: _net([L.Conv(2, (3,), padding="FULL"), L.Flatten(),
                                                 L.Dense(2)], (8, 1)),
     L.LayerError, "layer 1 (conv): padding must be 'SAME', 'VALID' or (lo, hi) pairs, got 'FULL'"),
    ("net-conv-negative-padding", lambda w: _net([L.Conv(2, (3,), padding=((1, -1),)), L.Flatten(),
                                                  L.Dense(2)], (8, 1)),
     L.LayerError, "layer 1 (conv): padding must be 'SAME', 'VALID' or 1 (lo, hi) pairs of ints "
                   ">= 0, got ((1, -1),)"),
    ("net-conv-stride-does-not-fit", lambda w: _net([L.Conv(2, (3,), 9, "VALID"), L.Flatten(),
                                                     L.Dense(2)], (4, 1)),
     L.LayerError, "layer 1 (conv): stride 9 does not fit the padded input of size 4"),
    ("net-conv-kernel-does-not-fit", lambda w: _net([L.Conv(2, (5,), padding="VALID"),
                                                     L.Flatten(), L.Dense(2)], (4, 1)),
     L.LayerError, "layer 1 (conv): kernel 5 does not fit the padded input of size 4"),
    ("net-dropout-rate-one", lambda w: _net([L.Dense(3), L.Dropout(1.0), L.Dense(2)]),
     L.LayerError, "layer 2 (dropout): rate (the drop probability) must be a number in [0, 1), "
                   "got 1.0"),
    ("net-dropout-rate-negative", lambda w: _net([L.Dropout(-0.1), L.Dense(2)]), L.LayerError,
     "layer 1 (dropout): rate (the drop probability) must be a number in [0, 1), got -0.1"),
    ("net-batch-norm-momentum-one", lambda w: _net([L.BatchNorm(momentum=1.0), L.Dense(2)]),
     L.LayerError, "layer 1 (batch_norm): momentum must be a number in [0, 1), got 1.0"),
    ("net-batch-norm-momentum-negative", lambda w: _net([L.BatchNorm(momentum=-0.5), L.Dense(2)]),
     L.LayerError, "layer 1 (batch_norm): momentum must be a number in [0, 1), got -0.5"),
    ("net-batch-norm-eps-zero", lambda w: _net([L.Dense(3), L.BatchNorm(eps=0.0), L.Dense(2)]),
     L.LayerError, "layer 2 (batch_norm): eps must be a finite number > 0, got 0.0"),
    ("net-layer-norm-eps-negative", lambda w: _net([L.LayerNorm(eps=-1e-5), L.Dense(2)]),
     L.LayerError, "layer 1 (layer_norm): eps must be a finite number > 0, got -1e-05"),
    ("net-max-pool-does-not-divide", lambda w: _net([L.MaxPool((2,)), L.Flatten(), L.Dense(2)],
                                                    (5, 1)),
     L.LayerError, "layer 1 (max_pool): window 2 with stride 2 does not divide the input size 5"),
    ("net-avg-pool-does-not-divide", lambda w: _net([L.AvgPool((2, 2), (1, 3)), L.Flatten(),
                                                     L.Dense(2)], (4, 4, 1)),
     L.LayerError, "layer 1 (avg_pool): window 2 with stride 3 does not divide the input size 4"),
    ("net-pool-zero-stride", lambda w: _net([L.MaxPool((2,), (0,)), L.Flatten(), L.Dense(2)],
                                            (4, 1)),
     L.LayerError,
     "layer 1 (max_pool): strides must be a positive int or a tuple of them, got (0,)"),
    ("net-conv-after-flatten", lambda w: _net([L.Flatten(), L.Conv(2, (3, 3)), L.Flatten(),
                                               L.Dense(2)], (4, 4, 1)),
     L.LayerError, "layer 2 (conv): a 2-D convolution needs per-example inputs of shape (height, "
                   "width, channels), got (16,)"),
    ("net-dense-on-3d-input", lambda w: _net([L.Conv(2, (3, 3)), L.Dense(3), L.Flatten(),
                                              L.Dense(2)], (4, 4, 1)),
     L.LayerError, "layer 2 (dense): needs a vector input (batch, features), got per-example "
                   "shape (4, 4, 2); put a Flatten() before it"),
    ("net-branch-changes-more-than-the-last-axis", lambda w: _net(
        [L.Residual((L.Conv(3, (3,), strides=2),)), L.Flatten(), L.Dense(2)], (8, 2)),
     L.LayerError, "layer 1 (residual): the branch maps per-example shape (8, 2) to (4, 3); a "
                   "projection can only change the last axis"),
    ("net-bad-layer-in-branch", lambda w: _net([L.Dense(3), L.Residual((L.Dropout(1.5),)),
                                                L.Dense(2)]),
     L.LayerError, "layer 2 (residual): branch layer 1 (dropout): rate (the drop probability) "
                   "must be a number in [0, 1), got 1.5"),
    ("net-residual-nan-alpha", lambda w: _net([L.Residual((L.Dense(4),), math.nan), L.Dense(2)]),
     L.LayerError, "layer 1 (residual): alpha must be a finite number, got nan"),
    ("net-reshape-wrong-size", lambda w: _net([L.Reshape((4, 2)), L.Flatten(), L.Dense(2)], 6),
     L.LayerError, "layer 1 (reshape): cannot reshape per-example shape (6,) (6 entries) to (4, 2) "
                   "(8 entries)"),
    ("net-unknown-activation", lambda w: _net([L.Dense(3, "swish"), L.Dense(2)]), L.LayerError,
     "layer 1 (dense): unknown activation 'swish'; expected one of ['gelu'"),
    ("net-unknown-activation-layer", lambda w: _net([L.Dense(3), L.Activation("swish"),
                                                     L.Dense(2)]),
     L.LayerError, "layer 2 (activation): unknown activation 'swish'"),
    ("net-last-layer-not-a-vector", lambda w: _net([L.Conv(2, (3,))], (4, 2)), L.LayerError,
     "layer 1 (conv) outputs per-example shape (4, 2), but the loss needs a vector (batch, n): "
     "end with Flatten() and Dense(n)"),
    ("net-squashed-logits", lambda w: _net([L.Dense(3), L.Dense(2, "sigmoid")]), L.LayerError,
     "loss='softmax_cross_entropy' applies its own softmax/sigmoid to the logits, so layer 2 "
     "(dense) must have activation 'identity', got 'sigmoid'"),
    ("net-squashed-logits-bce", lambda w: _net([L.Dense(2, "tanh")],
                                               loss="sigmoid_binary_cross_entropy"),
     L.LayerError, "so layer 1 (dense) must have activation 'identity', got 'tanh'"),
    ("net-no-layers", lambda w: _net([]), L.LayerError,
     "layers must be a non-empty sequence of fnbp.layers kinds, got ()"),
    ("net-not-a-layer", lambda w: _net([L.Dense(3), "relu", L.Dense(2)]), L.LayerError,
     "layer 2: expected an fnbp.layers kind (Dense, Conv, BatchNorm, …), got str"),
    ("net-bad-input-shape", lambda w: _net([L.Dense(2)], (4, 0)), ValueError,
     "Net: input_shape must be a positive int or a tuple of them, got (4, 0)"),
    # nets: the mode, the state and the key
    ("net-missing-train-batch-norm", lambda w: fnbp.loss(_np(), NET, X, Y,
                                                         state=fnbp.init_state(NET)),
     ValueError, "loss: the net's layer 2 (batch_norm) behaves differently in training and "
                 "evaluation; pass train=True or train=False"),
    ("net-missing-train-dropout", lambda w: fnbp.backprop(_np(DROPOUT), DROPOUT, X, Y),
     ValueError, "backprop: the net's layer 2 (dropout) behaves differently in training and "
                 "evaluation; pass train=True or train=False"),
    ("net-train-not-a-bool", lambda w: fnbp.loss(_np(), NET, X, Y, state=fnbp.init_state(NET),
                                                 train="yes"),
     TypeError, "loss: train must be True, False or None, got 'yes'"),
    ("net-missing-state", lambda w: fnbp.forward(_np(), NET, X), ValueError,
     "forward: the net's layer 2 (batch_norm) keeps running statistics; pass state= "
     "(fnbp.init_state(net) to start"),
    ("net-missing-state-train", lambda w: fnbp.backprop(_np(), NET, X, Y, train=True,
                                                        key=jax.random.key(0)),
     ValueError, "backprop: the net's layer 2 (batch_norm) keeps running statistics; pass state="),
    ("net-missing-key", lambda w: fnbp.backprop(_np(), NET, X, Y, state=fnbp.init_state(NET),
                                                train=True),
     ValueError, "backprop: the net's layer 3 (dropout) drops units in train mode; pass key= (a "
                 "PRNG key"),
    ("net-missing-key-in-branch", lambda w: fnbp.loss(_np(BRANCH), BRANCH, X, Y, train=True),
     ValueError, "loss: the net's layer 1 (residual) branch layer 2 (dropout) drops units in train "
                 "mode; pass key="),
    ("per-example-train-batch-norm", lambda w: fnbp.per_example_grads(
        _np(), NET, X, Y, state=fnbp.init_state(NET), key=jax.random.key(0), train=True),
     ValueError, "per_example_grads: the net's layer 2 (batch_norm) couples the examples of a "
                 "batch in train mode"),
    # nets: params and state that do not fit
    ("net-params-wrong-shape", lambda w: _eval(fnbp.backprop, params=_replace(
        _np(), 1, {"gamma": jnp.ones(5), "beta": jnp.zeros(6)})),
     ValueError, "params[1]['gamma'] (layer 2, batch_norm) must have shape (6,), got (5,)"),
    ("net-params-missing-key", lambda w: _eval(fnbp.loss, params=_replace(
        _np(), 1, {"gamma": jnp.ones(6)})),
     ValueError, "params[1] (layer 2, batch_norm) must have the structure {'beta': array, "
                 "'gamma': array}, got {'gamma': array}"),
    ("net-params-missing-branch-layer", lambda w: _eval(fnbp.backprop, params=_replace(
        _np(), 3, {"branch": _np()[3]["branch"][:1]})),
     ValueError, "params[3] (layer 4, residual) must have the structure {'branch': [{'W': array, "
                 "'b': array}, {}]}, got {'branch': [{'W': array, 'b': array}]}"),
    ("net-params-for-a-param-free-layer", lambda w: _eval(fnbp.backprop, params=_replace(
        _np(), 2, {"W": jnp.ones(3)})),
     ValueError, "params[2] (layer 3, dropout) must have the structure {}, got {'W': array}"),
    ("net-params-int-dtype", lambda w: _eval(fnbp.backprop, params=_replace(
        _np(), 1, {"gamma": jnp.ones(6, jnp.int32), "beta": jnp.zeros(6)})),
     TypeError, "params[1]['gamma'] (layer 2, batch_norm) must be a floating array, got int32"),
    ("net-params-count", lambda w: _eval(fnbp.backprop, params=_np()[:4]), ValueError,
     "params has 4 entries but the net has 5 layers"),
    ("net-params-of-an-mlp", lambda w: _eval(fnbp.loss, params=_params()), ValueError,
     "params has 2 entries but the net has 5 layers"),
    ("net-state-wrong-shape", lambda w: _eval(fnbp.loss, state=_replace(
        fnbp.init_state(NET), 1, {"mean": jnp.zeros(5), "var": jnp.ones(6)})),
     ValueError, "state[1]['mean'] (layer 2, batch_norm) must have shape (6,), got (5,)"),
    ("net-state-missing-key", lambda w: _eval(fnbp.loss, state=_replace(
        fnbp.init_state(NET), 1, {"mean": jnp.zeros(6)})),
     ValueError, "state[1] (layer 2, batch_norm) must have the structure {'mean': array, 'var': "
                 "array}, got {'mean': array}"),
    ("net-state-missing-branch", lambda w: _eval(fnbp.loss, state=_replace(
        fnbp.init_state(NET), 3, {})),
     ValueError, "state[3] (layer 4, residual) must have the structure {'branch': [{}, {}]}, "
                 "got {}"),
    ("net-state-count", lambda w: _eval(fnbp.loss, state=fnbp.init_state(NET)[:2]),
     ValueError, "state has 2 entries but the net has 5 layers"),
    ("net-state-not-a-list", lambda w: _eval(fnbp.loss, state={"mean": jnp.zeros(6)}),
     TypeError, "state must be a list aligned with the net's layers (from fnbp.init_state), got "
                "dict"),
    ("net-x-wrong-shape", lambda w: fnbp.forward(_np(CNN), CNN, X), ValueError,
     "x must have shape (batch, 4, 4, 1) for the net's input_shape (4, 4, 1), got (5, 4)"),
    # nets: JSON
    ("net-json-invalid", lambda w: _from_file(w, "net-not-json.json"), ValueError,
     "net spec is not valid JSON"),
    ("net-json-not-text", lambda w: fnbp.Net.from_json(None), ValueError,
     "net spec is not valid JSON (the JSON object must be str"),
    ("net-json-unknown-kind", lambda w: _from_file(w, "net-unknown-kind.json"), L.LayerError,
     "layer 2: unknown kind 'attention'; expected one of ['activation', 'avg_pool'"),
    ("net-json-unknown-field", lambda w: _from_file(w, "net-unknown-field.json"), L.LayerError,
     "layer 1 (dense): unknown field 'widht'; expected some of ['activation', 'features', "
     "'use_bias']"),
    ("net-json-unknown-field-in-branch", lambda w: fnbp.Net.from_json(_net_json(
        [{"kind": "residual", "branch": [{"kind": "dense", "features": 64, "bias": True}]},
         DENSE10])),
     L.LayerError, "layer 1 (residual) branch layer 1 (dense): unknown field 'bias'"),
    ("net-json-missing-field", lambda w: fnbp.Net.from_json(_net_json([{"kind": "dense"}])),
     L.LayerError, "layer 1 (dense): missing field 'features'; a dense needs ['features']"),
    ("net-json-bad-field", lambda w: _from_file(w, "net-zero-features.json"), L.LayerError,
     "Net: layer 1 (dense): features must be a positive int, got 0"),
    ("net-json-layer-not-an-object", lambda w: fnbp.Net.from_json(_net_json([DENSE10, 3])),
     L.LayerError, "layer 2: expected an object with a 'kind', got 3"),
    ("net-json-unknown-net-field", lambda w: fnbp.Net.from_json(json.dumps(
        {"kind": "net", "input_shape": [4], "layers": [DENSE10], "optimizer": "adam"})),
     ValueError, "net spec: unknown field 'optimizer'"),
    ("net-json-not-a-net", lambda w: fnbp.Net.from_json('{"kind": "mlp", "sizes": [4, 3]}'),
     ValueError, 'a net spec must be an object with "kind": "net", got'),
]  # fmt: skip


@pytest.mark.parametrize("call, error, match", [c[1:] for c in API], ids=[c[0] for c in API])
def test_bad_api_input_gets_a_clear_error_and_writes_nothing(world, call, error, match):
    before = _snapshot(world)
    with pytest.raises(error) as e:
        call(world)
    assert type(e.value) is error, f"{type(e.value).__name__}: {e.value}"
    assert match in str(e.value), str(e.value)
    after = _snapshot(world)
    after.pop("ckpt", None)  # the checkpoint-folder row's first, good run
    assert {k: v for k, v in after.items() if not k.startswith("ckpt/")} == before


# ----------------------------------------------------------------------------------------------
# The command line: exit code 2 and one line

SMALL = ["--sizes", "64,8,10", "--epochs", "1", "--no-progress"]
CLI = [
    ("sizes-one", ["train", "--sizes", "64"], "fnbp: error: MLP: sizes needs at least two"),
    ("sizes-not-ints", ["train", "--sizes", "64,x,10"], "--sizes must be comma-separated"),
    ("lr-zero", ["train", "--lr", "0"], "argument --lr: must be > 0"),
    ("lr-nan", ["train", "--lr", "nan"], "argument --lr: must be > 0"),
    ("epochs-zero", ["train", "--epochs", "0"], "argument --epochs: must be > 0"),
    ("epochs-float", ["train", "--epochs", "1.5"], "argument --epochs: expected a int"),
    ("batch-size-zero", ["train", "--batch-size", "0"], "argument --batch-size: must be > 0"),
    ("batch-size-over-n", ["train", *SMALL, "--batch-size", "2000"],
     "--batch-size 2000 exceeds the 1437 training examples"),
    ("l2-negative", ["train", "--l2", "-1"], "argument --l2: must be >= 0"),
    ("l2-inf", ["train", "--l2", "inf"], "argument --l2: must be >= 0 (and finite)"),
    ("momentum-negative", ["train", "--momentum", "-0.5"], "argument --momentum: must be >= 0"),
    ("unknown-activation", ["train", "--activation", "swish"],
     "argument --activation: invalid choice: 'swish'"),
    ("unknown-init", ["train", "--init", "xavier"], "argument --init: invalid choice"),
    ("unknown-dataset", ["train", "--dataset", "cifar"], "argument --dataset: invalid choice"),
    ("unknown-loss", ["train", "--loss", "hinge"], "argument --loss: invalid choice"),
    ("unknown-option", ["train", "--learning-rate", "0.1"],
     "unrecognized arguments: --learning-rate"),
    ("unknown-command", ["fly"], "argument command: invalid choice: 'fly'"),
    ("sizes-do-not-fit", ["train", *SMALL[2:], "--sizes", "64,8,3"],
     "does not fit dataset digits: it has 64 features and 10 outputs"),
    ("regression-with-ce", ["train", *SMALL[2:], "--dataset", "teacher_student", "--loss",
                            "softmax_cross_entropy"], "is a regression task: use --loss mse"),
    ("mnist-without-folder", ["train", *SMALL, "--dataset", "mnist"],
     "--dataset mnist needs --data-dir"),
    ("mnist-missing-folder", ["train", *SMALL, "--dataset", "mnist", "--data-dir", "nowhere"],
     "MNIST folder 'nowhere' does not exist"),
    ("mnist-malformed", ["train", "--sizes", "784,8,10", "--epochs", "1", "--dataset", "mnist",
                         "--data-dir", "mnist-bad-magic"], "not an IDX file (bad magic number"),
    ("mnist-nan", ["train", "--sizes", "784,8,10", "--epochs", "1", "--dataset", "mnist",
                   "--data-dir", "mnist-nan"], "train-images-idx3-ubyte: holds 1 NaN or Inf"),
    ("out-exists", ["train", *SMALL, "--out", "old-run"],
     "--out old-run already exists and is not empty; pass --overwrite"),
    ("out-is-a-file", ["train", *SMALL, "--out", "a-file"], "--out a-file is a file"),
    ("out-under-a-file", ["train", *SMALL, "--out", "a-file/run"],
     "--out a-file/run: cannot create the run folder (Not a directory)"),
    ("out-unwritable", ["train", *SMALL, "--out", "/proc/fnbp-run"],
     "--out /proc/fnbp-run: cannot create the run folder"),
    ("checkpoint-every-zero", ["train", "--checkpoint-every", "0"],
     "argument --checkpoint-every: must be > 0"),
    ("devices-zero", ["train", "--devices", "0"], "argument --devices: expected a positive int"),
    ("devices-too-many", ["train", *SMALL, "--devices", "64"], "--devices 64: devices must be"),
    ("unknown-guard", ["train", "--on-nonfinite", "ignore"], "argument --on-nonfinite"),
    ("unknown-compute-dtype", ["train", "--compute-dtype", "float16"],
     "argument --compute-dtype: invalid choice: 'float16'"),
    ("resume-missing", ["train", "--resume", "nowhere"], "--resume nowhere: no such run folder"),
    ("resume-not-a-run", ["train", "--resume", "old-run"], "it has no config.json"),
    ("resume-with-options", ["train", "--resume", "old-run", "--lr", "0.1"], "drop --lr"),
    ("early-stopping-zero", ["train", "--early-stopping", "0"],
     "argument --early-stopping: must be > 0"),
    ("early-stopping-float", ["train", "--early-stopping", "1.5"],
     "argument --early-stopping: expected a int"),
    ("val-fraction-one", ["train", "--val-fraction", "1"],
     "argument --val-fraction: must be a fraction in (0, 1), got 1"),
    ("val-fraction-negative", ["train", "--val-fraction", "-0.1"],
     "argument --val-fraction: must be a fraction in (0, 1), got -0.1"),
    ("val-fraction-nan", ["train", "--val-fraction", "nan"],
     "argument --val-fraction: must be a fraction in (0, 1), got nan"),
    ("val-fraction-holds-out-none", ["train", *SMALL, "--val-fraction", "0.0001"],
     "--val-fraction 0.0001 of the 1437 training examples holds out no validation examples"),
    ("val-fraction-leaves-no-training", ["train", *SMALL, "--early-stopping", "2",
                                         "--val-fraction", "0.9999"],
     "--val-fraction 0.9999 of the 1437 training examples holds out every one for validation"),
    ("batch-size-over-n-after-holdout", ["train", *SMALL, "--early-stopping", "2",
                                         "--batch-size", "1300"],
     "--batch-size 1300 exceeds the 1293 training examples left after holding out 144 for "
     "validation"),
    ("resume-with-early-stopping", ["train", "--resume", "old-run", "--early-stopping", "3"],
     "drop --early-stopping"),
    # instruments and DP-SGD
    ("instruments-every-alone", ["train", *SMALL, "--instruments-every", "4"],
     "--instruments-every 4 sets how often --instruments records; add --instruments"),
    ("instruments-every-zero", ["train", "--instruments", "--instruments-every", "0"],
     "argument --instruments-every: must be > 0"),
    ("instruments-autodiff", ["train", *SMALL, "--instruments", "--grads", "autodiff"],
     "--instruments reads the hand-written backward pass's a and δ; drop --grads autodiff"),
    ("resume-with-instruments", ["train", "--resume", "old-run", "--instruments"],
     "drop --instruments"),
    ("dp-noise-alone", ["train", *SMALL, "--dp-noise", "1"],
     "--dp-noise without --dp-clip: DP-SGD needs both the clip norm and the noise multiplier; "
     "add --dp-clip C"),
    ("dp-clip-alone", ["train", *SMALL, "--dp-clip", "1"],
     "--dp-clip without --dp-noise: DP-SGD needs both"),
    ("dp-delta-alone", ["train", *SMALL, "--dp-delta", "1e-6"], "--dp-delta without --dp-clip"),
    ("dp-clip-zero", ["train", "--dp-clip", "0"], "argument --dp-clip: must be > 0"),
    ("dp-noise-negative", ["train", "--dp-noise", "-1"], "argument --dp-noise: must be >= 0"),
    ("dp-delta-one", ["train", "--dp-delta", "1"],
     "argument --dp-delta: must be a probability in (0, 1), got 1"),
    ("dp-with-bfloat16", ["train", *SMALL, "--dp-clip", "1", "--dp-noise", "1",
                          "--compute-dtype", "bfloat16"], "drop --compute-dtype bfloat16"),
    ("dp-with-instruments", ["train", *SMALL, "--dp-clip", "1", "--dp-noise", "1",
                             "--instruments"], "drop --instruments"),
    ("dp-with-batchnorm", ["train", "--arch", "resmlp", "--depth", "1", "--width", "8",
                           "--norm", "batch", "--dp-clip", "1", "--dp-noise", "1"],
     "--dp-clip: --arch resmlp has a layer 2 (residual) branch layer 2 (batch_norm) that "
     "couples the examples of a batch in train mode"),
    ("check-one-size", ["check", "--sizes", "64"], "sizes needs at least two entries"),
    ("check-unknown-dtype", ["check", "--dtype", "float16"], "argument --dtype: invalid choice"),
    # nets: --net FILE.json, --arch presets
    ("net-missing-file", ["train", *SMALL[2:], "--net", "nowhere.json"],
     "--net nowhere.json: no such file"),
    ("net-unreadable", ["train", *SMALL[2:], "--net", "old-run"],
     "--net old-run: cannot read it (Is a directory)"),
    ("net-not-json", ["train", *SMALL[2:], "--net", "net-not-json.json"],
     "--net net-not-json.json: net spec is not valid JSON"),
    ("net-unknown-kind", ["train", *SMALL[2:], "--net", "net-unknown-kind.json"],
     "layer 2: unknown kind 'attention'; expected one of ['activation'"),
    ("net-unknown-field", ["train", *SMALL[2:], "--net", "net-unknown-field.json"],
     "layer 1 (dense): unknown field 'widht'; expected some of"),
    ("net-zero-features", ["train", *SMALL[2:], "--net", "net-zero-features.json"],
     "layer 1 (dense): features must be a positive int, got 0"),
    ("net-bad-stride", ["train", *SMALL[2:], "--net", "net-bad-stride.json"],
     "layer 2 (conv): strides must be a positive int"),
    ("net-input-does-not-fit", ["train", *SMALL[2:], "--net", "net-40-inputs.json"],
     "the net's input_shape (40,) takes 40 features per example, but dataset digits has "
     "inputs of shape (1437, 64)"),
    ("net-outputs-do-not-fit", ["train", *SMALL[2:], "--net", "net-3-outputs.json"],
     "the net has 3 outputs, but dataset digits has 10 classes"),
    ("net-regression-with-ce", ["train", *SMALL[2:], "--dataset", "teacher_student", "--net",
                                "net.json"], "has loss softmax_cross_entropy: it needs mse"),
    ("net-and-sizes", ["train", *SMALL, "--net", "net.json"],
     "--net and --sizes both choose the net; give one of"),
    ("net-and-arch", ["train", "--net", "net.json", "--arch", "cnn"],
     "--net and --arch both choose the net"),
    ("sizes-and-arch", ["train", *SMALL, "--arch", "resmlp"], "--sizes and --arch both choose"),
    ("net-with-activation", ["train", "--net", "net.json", "--activation", "tanh", "--loss",
                             "mse"], "sets its own activations, loss and dropout layers; drop "
                                     "--activation, --loss"),
    ("depth-without-arch", ["train", "--depth", "3"],
     "--depth sets the blocks of --arch resmlp, but the net is an MLP (--sizes)"),
    ("width-with-cnn", ["train", "--arch", "cnn", "--width", "8", "--norm", "batch"],
     "--width sets the blocks of --arch resmlp, but the net is --arch cnn; drop --width, --norm"),
    ("alpha-with-net", ["train", "--net", "net.json", "--alpha", "0.1"],
     "but the net is --net net.json"),
    ("unknown-arch", ["train", "--arch", "vgg"], "argument --arch: invalid choice: 'vgg'"),
    ("unknown-norm", ["train", "--arch", "resmlp", "--norm", "group"],
     "argument --norm: invalid choice: 'group'"),
    ("depth-zero", ["train", "--arch", "resmlp", "--depth", "0"], "argument --depth: must be > 0"),
    ("alpha-nan", ["train", "--arch", "resmlp", "--alpha", "nan"],
     "argument --alpha: must be finite"),
    ("dropout-one", ["train", "--dropout", "1"],
     "argument --dropout: must be a drop probability in [0, 1), got 1"),
    ("arch-squashed-logits", ["train", "--arch", "cnn", "--output-activation", "sigmoid"],
     "--arch cnn on inputs of shape (64,): Net: loss='softmax_cross_entropy' applies its own "
     "softmax/sigmoid to the logits, so layer 8 (dense) must have activation 'identity'"),
    ("check-net-missing", ["check", "--net", "nowhere.json"], "--net nowhere.json: no such file"),
    ("check-net-unknown-kind", ["check", "--net", "net-unknown-kind.json"],
     "layer 2: unknown kind 'attention'"),
    ("check-net-and-sizes", ["check", "--net", "net.json", "--sizes", "64,10"],
     "--net and --sizes both choose the net"),
    ("check-depth-without-arch", ["check", "--net", "net.json", "--depth", "2"],
     "--depth sets the blocks of --arch resmlp"),
    ("check-unknown-mode", ["check", "--arch", "resmlp", "--mode", "test"],
     "argument --mode: invalid choice: 'test'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_bad_command_line_exits_2_with_one_line_and_writes_nothing(world, argv, match):
    before = _snapshot(world)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    lines = err.getvalue().strip().splitlines()
    assert rc == 2, err.getvalue()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in lines[0], lines
    assert match in lines[0], lines[0]
    assert out.getvalue() == ""
    assert _snapshot(world) == before


def test_the_catalogue_covers_at_least_25_bad_inputs_of_each_kind():
    assert len(API) >= 25 and len(CLI) >= 25
    assert len({c[0] for c in API}) == len(API) and len({c[0] for c in CLI}) == len(CLI)
