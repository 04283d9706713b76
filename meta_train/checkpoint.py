"""Training checkpoints: one safetensors file, tensors plus a JSON tree, with a checksum.

A checkpoint holds an arbitrary nested state (dicts, lists, tuples, ints, floats, strings,
tensors) such as ``{"learner": learner.state_dict(), "rng": ..., "step": 12}``. Tensors go
into the safetensors body; everything else becomes a JSON tree stored in the safetensors
header (``__metadata__["meta_train"]``) in which each tensor is a ``{"__tensor__": key}``
reference, with its strides when the tensor is a permuted (e.g. transposed) layout, so a
resumed run computes on the same memory layout and rounds the same way. A SHA-256 over the
JSON tree and every tensor's dtype, shape and bytes is stored beside it, so a file that is
truncated, bit-flipped, or not a meta_train checkpoint at all is refused with a one-line
:class:`CheckpointError` before anything is restored. Nothing in a checkpoint is ever
executed (no pickle).

A state whose floating tensors are not all finite is refused (:class:`NonFiniteState`): a
diverged run must not replace the last good checkpoint. Writes go through
:func:`metaopt.io.atomic_write` (temp file, fsync, rename) after the temporary file has been
read back and verified, so a crash or a failed write never replaces the previous good
checkpoint with a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from metaopt.io import atomic_write, first_non_finite

__all__ = ["CheckpointError", "NonFiniteState", "load_checkpoint", "save_checkpoint"]

FORMAT = "meta_train.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or not a meta_train checkpoint."""


class NonFiniteState(ValueError):
    """A training state turned non-finite: ``.detail`` says what (e.g. ``tensor 'x' is not
    finite``), ``.step`` the outer step (``None`` when unknown)."""

    def __init__(self, detail: str, step: int | None) -> None:
        super().__init__(f"{detail} at step {step}" if step is not None else detail)
        self.detail, self.step = detail, step


# --- state tree <-> (JSON tree, tensors) ------------------------------------------------------
def _is_dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ``stride`` lays ``shape`` out without gaps or overlap (a permutation of the
    contiguous layout); only such layouts are stored, and restored, exactly."""
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in stride):
        return False
    expected = 1
    for step, size in sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz != 1):
        if step != expected:
            return False
        expected *= size
    return True


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # clone: safetensors refuses shared storage and non-contiguous views
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        if obj.is_contiguous() or not _is_dense(obj.shape, obj.stride()):
            return {"__tensor__": key}
        # a permuted layout (EKFAC's transposed eigenvectors): matmuls on it round
        # differently from the contiguous copy, so resume restores the strides too
        return {"__tensor__": key, "stride": list(obj.stride())}
    if isinstance(obj, torch.Generator):
        raise TypeError("store generator.get_state() (a tensor), not the generator itself")
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float):
        # JSON has no inf/nan: keep them exact through repr
        if obj != obj or obj in (float("inf"), float("-inf")):
            return {"__float__": repr(obj)}
        return obj
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays / scalars
        import numpy as np

        return {"__ndarray__": _encode(torch.from_numpy(np.asarray(obj).copy()), tensors)}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        t = tensors[obj["__tensor__"]]
        stride = obj.get("stride")
        if stride is None:
            return t
        if not (len(stride) == t.dim() and _is_dense(t.shape, stride)):
            raise CheckpointError(f"tensor stride {stride} does not lay out shape {list(t.shape)}")
        return torch.empty_strided(t.shape, stride, dtype=t.dtype).copy_(t)
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__ndarray__" in obj:
        return _decode(obj["__ndarray__"], tensors).numpy()
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _digest(tree_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(tree_json.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        # view as bytes: works for every dtype (bf16 included) without numpy conversion
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- public API ----------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically; the old file survives any failure.

    Args:
        state: nested dicts/lists/tuples of tensors, numbers, strings, booleans and None.
        path: destination (conventionally ``DIR/checkpoint.safetensors``).

    Raises:
        NonFiniteState: a floating tensor of ``state`` holds NaN or infinity; ``path`` is
            left as it was.
    """
    bad = first_non_finite(state)
    if bad is not None:
        step = state.get("step")
        raise NonFiniteState(
            f"tensor {bad!r} is not finite", step if isinstance(step, int) else None
        )
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, tensors), sort_keys=True, allow_nan=False)
    digest = _digest(tree, tensors)
    header = {"meta_train": json.dumps({"format": FORMAT, "sha256": digest, "state": tree})}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        _read(tmp)  # verify what reached the disk before it replaces the old checkpoint

    atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt (checksum mismatch) or not
            a meta_train checkpoint; the message names the file and the reason.
    """
    return _read(path)


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = str(Path(path))
    if not os.path.isfile(name):
        raise CheckpointError(f"checkpoint {name!r} does not exist")
    try:
        tensors = load_file(name)
        with safe_open(name, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or not a safetensors file ({reason}); "
            "refusing to resume from it"
        ) from None
    try:
        info = json.loads(meta["meta_train"])
        fmt = info["format"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{name!r} is a safetensors file but not a meta_train checkpoint "
            "(no meta_train header); refusing to resume from it"
        ) from None
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {name!r} has format {fmt!r}; this code reads {FORMAT!r}")
    tree = info.get("state")
    if not isinstance(tree, str) or _digest(tree, tensors) != info.get("sha256"):
        raise CheckpointError(
            f"checkpoint {name!r} is corrupt (checksum mismatch); refusing to resume from it"
        )
    return _decode(json.loads(tree), tensors)
