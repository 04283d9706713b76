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
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.preconditioned import Preconditioned

__all__ = [
    "atomic_write",
    "load_learned_optimizer",
    "load_optimizer",
    "load_preconditioner",
    "read_metadata",
    "read_preconditioner_metadata",
    "save_learned_optimizer",
    "save_preconditioner",
]

FORMAT = "metaopt.preconditioner/1"
_MAX_HEADER = 100 * 1024 * 1024


def _version() -> str:
    from metaopt import __version__

    return __version__


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path`` (same directory).

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600; give the file the mode a plain open() would (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_current_umask())
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
    """
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in preconditioner.state_dict().items()}
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
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: unsupported format {meta.get('format')!r}")
    return meta


def load_preconditioner(path: str | os.PathLike[str], model: nn.Module) -> KroneckerPreconditioner:
    """Load a preconditioner saved for a model of ``model``'s architecture.

    Raises:
        ValueError: the file is not a metaopt safetensors preconditioner, or its layers do
            not match ``model`` (every mismatched layer is named with both shapes).
    """
    meta = read_preconditioner_metadata(path)
    pre = KroneckerPreconditioner.for_model(
        model, meta["family"], skip=meta["skip"], **meta["options"]
    )
    saved, ours = meta["layers"], pre.layer_shapes()
    problems = []
    for name in sorted(set(saved) | set(ours)):
        a, b = saved.get(name), ours.get(name)
        if a != b:
            problems.append(
                f"{name}: file {'x'.join(map(str, a)) if a else 'absent'} vs model "
                f"{'x'.join(map(str, b)) if b else 'absent'}"
            )
    if problems:
        raise ValueError(
            f"preconditioner {str(path)!r} does not fit this model: " + "; ".join(problems)
        )
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file: {err}") from None
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = next(iter(tensors.values())).dtype if tensors else torch.get_default_dtype()
    pre.to(dtype=dtype)
    missing, unexpected = pre.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"preconditioner {str(path)!r}: missing tensors {missing}, unexpected {unexpected}"
        )
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
    pre = load_preconditioner(path, model)
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("hparams", {}).items()}
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
