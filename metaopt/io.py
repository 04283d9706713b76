"""Learned-optimizer files: safetensors tensors plus JSON metadata, written atomically.

The metadata (family, options, layer names and shapes, the update rule with its
hyperparameters and learning rate, metaopt version, user metadata) is stored as JSON inside
the safetensors header (``__metadata__["metaopt"]``), so one file carries the whole
optimizer and nothing in it is ever executed when loading::

    metaopt.save_learned_optimizer(learner.learned_optimizer(), "opt.safetensors")
    opt = metaopt.load_optimizer("opt.safetensors", model)          # torch.optim.Optimizer
    opt = metaopt.load_optimizer("opt.safetensors", model, lr=3e-3, weight_decay=1e-4)
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metaopt.cli_support import one_line
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.preconditioned import Preconditioned

__all__ = [
    "atomic_write",
    "current_umask",
    "first_non_finite",
    "load_learned_optimizer",
    "load_optimizer",
    "load_preconditioner",
    "read_metadata",
    "read_preconditioner_metadata",
    "save_learned_optimizer",
    "save_preconditioner",
    "stale_temp_files",
]

FORMAT = "metaopt.preconditioner/1"
_MAX_HEADER = 100 * 1024 * 1024


def _version() -> str:
    from metaopt import __version__

    return __version__


def current_umask() -> int:
    """The process's umask (read without changing it for longer than this call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path`` (same directory).

    A crash at any point leaves either the old file or the new one, never a partial file;
    a kill can leave the temporary file ``.NAME.XXXXXXXX.tmp`` beside it, which
    :func:`stale_temp_files` finds when the next run starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600; give the file the mode a plain open() would (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stale_temp_files(folder: str | os.PathLike[str], names: list[str]) -> list[Path]:
    """The temporary files (``.NAME.XXXXXXXX.tmp``) that killed :func:`atomic_write` calls
    for the files ``names`` left in ``folder``, sorted; delete them only where no other
    process is writing those files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [re.compile(rf"\.{re.escape(n)}\.[A-Za-z0-9_]{{6,}}\.tmp") for n in names]
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and any(p.fullmatch(entry.name) for p in patterns)
    )


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The dotted path of the first floating tensor in ``tree`` (nested dicts, lists and
    tuples) that holds a NaN or an infinity, or ``None`` when every one is finite."""
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_preconditioner(
    preconditioner: KroneckerPreconditioner,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    optimizer: Mapping[str, Any] | None = None,
) -> None:
    """Write ``preconditioner`` to ``path`` (safetensors + JSON metadata), atomically.

    Args:
        preconditioner: the learned preconditioner.
        path: destination file (conventionally ``*.safetensors``).
        metadata: extra JSON-serialisable information (e.g. the training config).
        optimizer: the update rule it deploys with (``LearnedOptimizer.metadata()``);
            :func:`save_learned_optimizer` fills it.

    Raises:
        ValueError: a tensor holds NaN or infinity (named); nothing is written.
    """
    state = preconditioner.state_dict()
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(
            f"preconditioner tensor {bad!r} is not finite; refusing to write {str(path)!r}"
        )
    meta = {
        "format": FORMAT,
        "metaopt_version": _version(),
        "family": preconditioner.family_name,
        "options": preconditioner.options,
        "skip": preconditioner.skip,
        "layers": preconditioner.layer_shapes(),
        "param_shapes": {n: list(s) for n, s in preconditioner.param_shapes.items()},
        "user": dict(metadata or {}),
    }
    if optimizer is not None:
        meta["optimizer"] = dict(optimizer)
    header = {"metaopt": json.dumps(meta)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_preconditioner_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a preconditioner file; ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preconditioner file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > _MAX_HEADER or n > path.stat().st_size - 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (bad header length)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{str(path)!r} is not a safetensors file (header is not JSON)") from None
    info = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    try:
        meta = json.loads(info["metaopt"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a metaopt preconditioner "
            "(no metaopt metadata)"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r}: metaopt metadata is {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: unsupported format {meta.get('format')!r}")
    return meta


def _check_metadata(meta: Mapping[str, Any], name: str) -> None:
    """``ValueError`` naming the first metadata field that is missing or malformed."""
    for key, kind in (("family", str), ("options", dict), ("layers", dict)):
        if not isinstance(meta.get(key), kind):
            found = "missing" if key not in meta else f"{meta[key]!r}"
            raise ValueError(
                f"preconditioner {name!r}: metadata field {key!r} is {found}; "
                f"expected a {kind.__name__}"
            )
    for layer, shape in meta["layers"].items():
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ValueError(
                f"preconditioner {name!r}: metadata layers[{layer!r}]={shape!r}; "
                "expected [out, in] (two non-negative integers)"
            )
    skip = meta.get("skip")
    if skip is not None:
        try:
            re.compile(skip)
        except (re.error, TypeError) as err:
            raise ValueError(
                f"preconditioner {name!r}: metadata skip={skip!r} is not a valid regex ({err})"
            ) from None


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str
) -> None:
    """``ValueError`` naming the first tensor that is missing, unexpected, not floating
    point, of a shape the metadata does not give, or not finite."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"preconditioner {name!r}: missing tensors {missing}, unexpected {unexpected}"
        )
    for key in sorted(tensors):
        t, want = tensors[key], expected[key]
        if not t.is_floating_point():
            raise ValueError(f"preconditioner {name!r}: tensor {key!r} has dtype {t.dtype}")
        if t.shape != want.shape:
            raise ValueError(
                f"preconditioner {name!r}: tensor {key!r} has shape {list(t.shape)}, but the "
                f"file's metadata (family, options, layers) gives {list(want.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"preconditioner {name!r}: tensor {key!r} holds NaN or infinity")


def load_preconditioner(path: str | os.PathLike[str], model: nn.Module) -> KroneckerPreconditioner:
    """Load a preconditioner saved for a model of ``model``'s architecture.

    Raises:
        ValueError: the file is not a metaopt safetensors preconditioner; its metadata lacks
            a field or holds a malformed one (``layers``, an invalid ``skip`` regex, ...);
            its layers do not match ``model`` (every mismatched layer is named with both
            shapes); or a tensor is missing, of a shape its metadata does not give, or not
            finite (the tensor is named).
    """
    meta = read_preconditioner_metadata(path)
    name = str(path)
    _check_metadata(meta, name)
    try:
        pre = KroneckerPreconditioner.for_model(
            model, meta["family"], skip=meta.get("skip"), **meta["options"]
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"preconditioner {name!r}: metadata family={meta['family']!r} with options "
            f"{meta['options']} does not build ({one_line(err)})"
        ) from None
    saved, ours = meta["layers"], pre.layer_shapes()
    problems = []
    for layer in sorted(set(saved) | set(ours)):
        a, b = saved.get(layer), ours.get(layer)
        if a != b:
            problems.append(
                f"{layer}: file {'x'.join(map(str, a)) if a else 'absent'} vs model "
                f"{'x'.join(map(str, b)) if b else 'absent'}"
            )
    if problems:
        raise ValueError(f"preconditioner {name!r} does not fit this model: " + "; ".join(problems))
    try:
        tensors = load_file(name)
    except SafetensorError as err:
        raise ValueError(f"{name!r} is not a valid safetensors file: {err}") from None
    _check_tensors(tensors, pre.state_dict(), name)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = next(iter(tensors.values())).dtype if tensors else torch.get_default_dtype()
    pre.to(dtype=dtype)
    pre.load_state_dict(tensors)
    return pre.to(device)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A learned-optimizer (or preconditioner) file's metadata: ``family``, ``options``,
    ``layers``, ``optimizer`` (``rule``, ``hparams``, ``lr``, ``compose``; absent in a bare
    preconditioner file), ``user`` (e.g. the meta-training config) and the format and
    metaopt version. Reads the header only; ``ValueError`` if it is not such a file."""
    return read_preconditioner_metadata(path)


def save_learned_optimizer(
    learned: LearnedOptimizer,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a learned optimizer (its preconditioner's tensors, its rule, hyperparameters
    and learning rate) to one file, atomically."""
    if learned.preconditioner is None:
        raise ValueError(
            "learned: has no preconditioner, so there is nothing to store but its rule "
            f"({learned.rule!r}, lr={learned.lr}); build it with torch.optim directly"
        )
    save_preconditioner(learned.preconditioner, path, metadata, optimizer=learned.metadata())


def load_learned_optimizer(path: str | os.PathLike[str], model: nn.Module) -> LearnedOptimizer:
    """The :class:`~metaopt.optim.LearnedOptimizer` stored in ``path``, its preconditioner
    loaded for ``model`` (validated like :func:`load_preconditioner`)."""
    meta = read_preconditioner_metadata(path)
    spec = meta.get("optimizer")
    if not isinstance(spec, dict):
        raise ValueError(
            f"{str(path)!r} holds a preconditioner without an update rule (written by "
            "save_preconditioner); deploy it with metaopt.optim.Preconditioned(params, "
            "metaopt.load_preconditioner(path, model), lr=...)"
        )
    hparams = spec.get("hparams", {})
    if not isinstance(hparams, dict):
        raise ValueError(
            f"{str(path)!r}: metadata field 'optimizer.hparams' is {hparams!r}; expected a dict"
        )
    pre = load_preconditioner(path, model)
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}
    try:
        return LearnedOptimizer(pre, spec["rule"], hp, spec["lr"], spec.get("compose", "gradient"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{str(path)!r}: malformed optimizer metadata ({err})") from None


def load_optimizer(
    path: str | os.PathLike[str], model: nn.Module, lr: float | None = None, **overrides: Any
) -> Preconditioned:
    """The trained optimizer in ``path`` as a ``torch.optim.Optimizer`` over ``model``'s
    parameters: the same rule, hyperparameters and preconditioner; ``lr`` (default: the
    meta-trained one) and any rule hyperparameter (``weight_decay=...``) may be overridden."""
    learned = load_learned_optimizer(path, model)
    return learned.build(model.named_parameters(), lr, **overrides)
