"""Saving and loading parameters: ``.npz`` files that never execute code on load.

A file holds one array per leaf (``layer1/W``, ``layer1/b``, …) and the model spec as JSON
(``__model__``, stored as UTF-8 bytes). It is written to a temporary file in the same folder,
fsynced and renamed into place, so a crash never leaves a half-written file under the name.
Loading uses ``numpy.load(..., allow_pickle=False)``. Whole training states (optimizer state,
step, key) are checkpoints: :mod:`fnbp.checkpoint`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fnbp.model import MLP, Params, check_params


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file: fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one under ``path``, never a
    mix; the temporary name starts with a dot and is removed on any error.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if tmp.exists():
            tmp.unlink()


def _model_spec(model: MLP) -> dict:
    """The JSON form of an :class:`MLP` spec."""
    return {
        "sizes": list(model.sizes),
        "activation": model.activation,
        "loss": model.loss,
        "output_activation": model.output_activation,
    }


def _model_from_spec(spec: dict) -> MLP:
    """The inverse of :func:`_model_spec` (raises ``KeyError``/``ValueError``/``TypeError``)."""
    return MLP(tuple(spec["sizes"]), spec["activation"], spec["loss"], spec["output_activation"])


def save_params(path: str | os.PathLike, params: Params, model: MLP) -> None:
    """Write ``params`` and the ``model`` spec to ``path`` (an ``.npz`` file), atomically."""
    check_params(params, model)
    arrays = {}
    for l, p in enumerate(params, start=1):
        for k in ("W", "b"):
            v = np.asarray(p[k])
            if v.dtype.name == "bfloat16":  # .npz has no bfloat16: store float32, exact
                v = v.astype(np.float32)
            arrays[f"layer{l}/{k}"] = v
    arrays["__model__"] = np.frombuffer(json.dumps(_model_spec(model)).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(Path(path), buffer.getvalue())


def load_params(path: str | os.PathLike) -> tuple[Params, MLP]:
    """Read ``(params, model)`` written by :func:`save_params`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if it is not such a file or its arrays do not fit its spec.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such params file")
    try:
        with np.load(path, allow_pickle=False) as f:
            model = _model_from_spec(json.loads(bytes(f["__model__"]).decode()))
            params = [
                {k: np.array(f[f"layer{l}/{k}"]) for k in ("W", "b")}
                for l in range(1, model.num_layers + 1)
            ]
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid fnbp params file ({e})") from None
    try:
        check_params(params, model)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return params, model
