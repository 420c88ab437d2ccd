"""Checkpoints: a whole training state in a file that never executes code on load.

A :class:`Checkpoint` holds what a run needs to continue exactly where it stopped: the
parameters, a net's state (BatchNorm running statistics), the optimizer state, the step and
epoch counters, the run's PRNG key, the model spec, the run's settings and the loop's own
bookkeeping (both JSON), and any params the loop keeps aside (early stopping's best epoch's). :func:`fnbp.fit` writes them with ``checkpoint_dir=`` and continues
from the newest with ``resume=True``; a run resumed that way ends with parameters and state
bitwise identical (same device) to a run that was never stopped (dropout masks are a pure
function of the key and the step). :func:`save_checkpoint` and :func:`load_checkpoint` serve
your own loops the same way.

The file is a plain ``.npz`` (a zip of ``.npy`` arrays, read with ``allow_pickle=False``):

==================  =======================================================================
member              content
==================  =======================================================================
``params/<l>/W``    an MLP's parameter leaves (layer ``l = 1..L``), in their own dtype
``params/<l>/b``    (format version 1, unchanged since the first fnbp)
``params/<path>``   a net's parameter leaves under their tree path in ``params``
                    (``params/0/W``, ``params/2/gamma``, ``params/4/branch/0/W``: list
                    indices 0-based as in Python, so ``params/2/…`` is layer 3)
``state/<path>``    a net's state leaves the same way (``state/2/mean``); format version 2
``best/params/…``   params the loop kept aside, named as ``params/…`` (:func:`fnbp.fit`'s
``best/state/…``    early stopping: the best epoch's params and a net's state); absent when
                    it keeps none (every file written before early stopping existed)
``opt_state/<i>``   the optimizer state's leaves, in ``jax.tree`` order
``key``             the PRNG key's raw ``uint32`` data (``jax.random.key_data``)
``__meta__``        UTF-8 JSON: format, version, step, epoch, model spec (an MLP's four
                    fields, or the net's JSON: :meth:`fnbp.Net.to_json`), key
                    implementation, settings, loop state, every array's dtype and shape,
                    and their SHA-256
==================  =======================================================================

dtypes NumPy lacks (bfloat16) are stored bit for bit as unsigned integers of the same width.
Writing is atomic (a temporary file in the same folder, fsync, rename, fsync of the folder), so
a crash, ``kill -9`` or a full disk leaves the old file or the new one, never half of one.
Loading checks the zip, the JSON, the checksum, and every array's shape and dtype against the
model and optimizer you give, and raises ``ValueError`` naming the file and the problem (for
a net spec with an unknown layer kind, the layer too).

In a checkpoint folder the files are named ``ckpt-<step>.npz``, the step zero-padded to nine
digits; :func:`latest_checkpoint` finds the newest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnbp.io import (
    _atomic_write_bytes,
    _model_from_spec,
    _model_spec,
    _named_leaves,
    _net_params,
    _net_state,
    _state_layer,
)
from fnbp.model import MLP, Params, check_mode, check_params, init_state
from fnbp.net import Net

FORMAT = "fnbp-checkpoint"
VERSION = 1  # an MLP's checkpoint: params/<l>/W and params/<l>/b
NET_VERSION = 2  # a net's: params and state leaves by tree path
_NAME = re.compile(r"ckpt-(\d{9})\.npz")


class Checkpoint(NamedTuple):
    """A training state.

    Attributes:
        params: the model's params (for an MLP one ``{"W", "b"}`` dict per layer).
        opt_state: the optax state of those params.
        step: optimizer steps taken so far.
        epoch: epochs completed so far.
        key: the run's PRNG key (typed, ``jax.random.key``).
        model: the :class:`fnbp.MLP` or :class:`fnbp.Net` spec.
        config: the run's settings, JSON-able (``None``: none).
        loop: the training loop's own state, JSON-able (``None``: none); for
            :func:`fnbp.fit`, the history so far and the partial sums of the epoch in progress.
        state: a net's state (:func:`fnbp.init_state`'s structure), required for a net with
            BatchNorm (``None`` stands for the empty state of a net without); ``None`` for an
            MLP. :func:`load_checkpoint` always gives a net's state, an MLP's ``None``.
        best_params: a second set of params of the same model that the loop keeps aside
            (for :func:`fnbp.fit`'s early stopping, the best epoch's), or ``None``.
        best_state: the net's state that goes with ``best_params``, under the same rules as
            ``state``; :func:`load_checkpoint` gives it whenever it gives ``best_params``.
    """

    params: Params
    opt_state: optax.OptState
    step: int
    epoch: int
    key: jax.Array
    model: MLP | Net
    config: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None
    state: list | None = None
    best_params: Params | None = None
    best_state: list | None = None


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory/ckpt-<step>.npz``, the name :func:`fnbp.fit` gives the checkpoint of a step."""
    return Path(directory) / f"ckpt-{int(step):09d}.npz"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files in ``directory``, oldest step first (``[]`` if none or no folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name) and p.is_file())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint file in ``directory`` (by step), or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# Arrays to bytes and back.


def _storable(v: np.ndarray) -> np.ndarray:
    """``v`` itself, or for dtypes ``.npy`` cannot name (bfloat16), its bits as uint."""
    return v if v.dtype.isbuiltin == 1 else v.view(f"u{v.dtype.itemsize}")  # 2: user-defined


def _restored(v: np.ndarray, dtype: str) -> np.ndarray:
    return v if v.dtype.name == dtype else v.view(jnp.dtype(dtype))


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        v = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _leaf_names(tree, prefix: str) -> list[str]:
    return [f"{prefix}/{i}" for i in range(len(jax.tree.leaves(tree)))]


def _model_arrays(model, params, state, field: str = "") -> dict:
    """The checkpoint's ``{field}params`` and (a net's) ``{field}state``, ``field`` ``""`` or
    ``"best_"``, under their member names (``params/…``, ``state/…``, or ``best/params/…``,
    ``best/state/…``), checked against ``model``."""
    prefix = field.replace("_", "/")
    what = f"checkpoint.{field}state"
    check_params(params, model, name=f"checkpoint.{field}params" if field else "params")
    if isinstance(model, MLP):
        if state is not None:
            check_mode(model, state=state, train=False, key=None, what=what)
        return {
            f"{prefix}params/{l}/{k}": np.asarray(p[k])
            for l, p in enumerate(params, start=1)
            for k in ("W", "b")
        }
    if state is None:
        if _state_layer(model):
            raise ValueError(
                f"{what} is None, but the net's {_state_layer(model)} keeps running "
                f"statistics: pass Checkpoint(..., {field}state=state) (the state training "
                "returns)"
            )
        state = init_state(model)
    check_mode(model, state=state, train=False, key=None, what=what)
    named = {**_named_leaves(f"{prefix}params", params), **_named_leaves(f"{prefix}state", state)}
    return {name: np.asarray(v) for name, v in named.items()}


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` (an ``.npz`` file), atomically.

    Raises:
        ValueError, TypeError: if the params (or a net's state), or the best ones, do not
            fit the model, the key is not a single typed PRNG key, or ``config``/``loop`` are
            not JSON-able; nothing is written then.
    """
    path = Path(path)
    c = checkpoint
    arrays = _model_arrays(c.model, c.params, c.state)
    if c.best_params is not None:
        arrays.update(_model_arrays(c.model, c.best_params, c.best_state, "best_"))
    elif c.best_state is not None:
        raise ValueError("checkpoint.best_state is given without checkpoint.best_params")
    key = checkpoint.key
    if (
        not (hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key))
        or getattr(key, "shape", None) != ()
    ):
        raise TypeError(
            f"checkpoint.key must be a single typed PRNG key (jax.random.key(seed)), got {key!r}"
        )
    leaves = jax.tree.leaves(checkpoint.opt_state)
    arrays.update(
        {n: np.asarray(v) for n, v in zip(_leaf_names(leaves, "opt_state"), leaves, strict=True)}
    )
    arrays["key"] = np.asarray(jax.random.key_data(key))
    stored = {name: _storable(v) for name, v in arrays.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION if isinstance(checkpoint.model, MLP) else NET_VERSION,
        "step": int(checkpoint.step),
        "epoch": int(checkpoint.epoch),
        "model": _model_spec(checkpoint.model),
        "key_impl": str(jax.random.key_impl(key)),
        "opt_state_tree": str(jax.tree.structure(checkpoint.opt_state)),
        "arrays": {name: [v.dtype.name, list(v.shape)] for name, v in arrays.items()},
        "sha256": _digest(stored),
        "config": checkpoint.config or {},
        "loop": checkpoint.loop or {},
    }
    try:
        text = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint config and loop must be JSON-able: {e}") from None
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.frombuffer(text.encode(), np.uint8), **stored)
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta dict and arrays of a checkpoint file, checksum verified."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "__meta__" not in f.files:
                raise ValueError("it has no __meta__ record")
            meta = json.loads(bytes(f["__meta__"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"its __meta__ does not say format {FORMAT!r}")
            stored = {name: np.array(f[name]) for name in meta["arrays"]}
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable fnbp checkpoint ({e}); it is truncated or "
                         "corrupt") from None  # fmt: skip
    if meta.get("version") not in (VERSION, NET_VERSION):
        raise ValueError(
            f"{path}: checkpoint format version {meta.get('version')!r}, this fnbp reads "
            f"{VERSION} and {NET_VERSION}"
        )
    if _digest(stored) != meta.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch: the checkpoint is corrupt")
    arrays = {name: _restored(v, meta["arrays"][name][0]) for name, v in stored.items()}
    return meta, arrays


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Read ``path`` and check its checksum; returns its ``__meta__`` record.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: naming the file, if it is truncated, corrupt or not a checkpoint.
    """
    return _read(Path(path))[0]


def load_checkpoint(
    path: str | os.PathLike,
    optimizer: optax.GradientTransformation,
    model: MLP | Net | None = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Arguments:
        path: the ``.npz`` file.
        optimizer: the optax transformation the state belongs to; the stored leaves must match
            the structure, shapes and dtypes of ``optimizer.init(params)``.
        model: when given, the stored model spec must equal it.

    Returns:
        The :class:`Checkpoint`, arrays as ``jax.Array``; for a net with its ``state``.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: naming the file and the problem, if it is truncated, corrupt, of another
            model (or a net spec this fnbp cannot build: an unknown layer kind or field,
            naming the layer), or of another optimizer's state.
    """
    path = Path(path)
    meta, arrays = _read(path)
    try:
        stored_model = _model_from_spec(meta["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad model spec in checkpoint ({e})") from None
    if model is not None and stored_model != model:
        raise ValueError(
            f"{path}: the checkpoint is of another model: it holds {stored_model}, expected {model}"
        )
    model = stored_model
    params, state = _model_from_arrays(arrays, model, path)
    best_params = best_state = None
    if any(name.startswith("best/") for name in arrays):
        best_params, best_state = _model_from_arrays(arrays, model, path, "best_")
    like = jax.eval_shape(optimizer.init, params)
    like_leaves, treedef = jax.tree.flatten(like)
    names = _leaf_names(like_leaves, "opt_state")
    stored_names = [n for n in meta["arrays"] if n.startswith("opt_state/")]
    if len(stored_names) != len(names):
        raise ValueError(
            f"{path}: the optimizer state has {len(stored_names)} arrays but this optimizer's "
            f"has {len(names)}: it was saved with another optimizer ({meta.get('opt_state_tree')})"
        )
    leaves = []
    for name, want in zip(names, like_leaves, strict=True):
        got = arrays[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(
                f"{path}: {name} has shape {tuple(got.shape)} and dtype {got.dtype}, but this "
                f"optimizer's state needs {tuple(want.shape)} and {want.dtype}"
            )
        leaves.append(jnp.asarray(got))
    try:
        key = jax.random.wrap_key_data(jnp.asarray(arrays["key"]), impl=meta["key_impl"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad PRNG key in checkpoint ({e})") from None
    return Checkpoint(
        params=params,
        opt_state=jax.tree.unflatten(treedef, leaves),
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        key=key,
        model=model,
        config=meta.get("config") or None,
        loop=meta.get("loop") or None,
        state=state,
        best_params=best_params,
        best_state=best_state,
    )


def _model_from_arrays(
    arrays: dict, model, path: Path | str, field: str = ""
) -> tuple[Params, list | None]:
    """``(params, state)`` of ``model`` from a checkpoint's arrays (state ``None`` for an
    MLP), checked against the model: those named ``params/…`` and ``state/…``, or with
    ``field="best_"`` those named ``best/params/…`` and ``best/state/…``."""
    if field:
        prefix = field.replace("_", "/")
        arrays = {n[len(prefix) :]: v for n, v in arrays.items() if n.startswith(prefix)}
        path = f"{path}: the {field[:-1]} params"
    if isinstance(model, MLP):
        try:
            params = [
                {k: arrays[f"params/{l}/{k}"] for k in ("W", "b")}
                for l in range(1, model.num_layers + 1)
            ]
        except KeyError as e:
            raise ValueError(f"{path}: the checkpoint has no array {e}") from None
        state = None
    else:
        params = _net_params(arrays, model, path)
        state = jax.tree.map(jnp.asarray, _net_state(arrays, model, path))
    params = jax.tree.map(jnp.asarray, params)
    check_params(params, model, name=f"{path}: params")
    return params, state


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints in ``directory``."""
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
