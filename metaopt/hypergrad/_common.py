"""Shared helpers of the engines: input normalisation and option checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Vec = tuple[Tensor, ...]


def as_leaves(tensors: Sequence[Tensor] | Iterable[Tensor], field: str) -> Vec:
    """Detached floating-point copies-by-reference of ``tensors`` (new graph leaves)."""
    if isinstance(tensors, Tensor):
        raise ValueError(f"{field}: expected a sequence of tensors, got a single Tensor")
    out = tuple(tensors)
    if not out:
        raise ValueError(f"{field}: expected at least one tensor, got none")
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise ValueError(f"{field}[{i}]: expected a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{field}[{i}]: dtype {t.dtype} is not a floating-point dtype")
    return tuple(t.detach() for t in out)


def take_options(
    method: str, options: Mapping[str, Any], allowed: Mapping[str, Any]
) -> dict[str, Any]:
    """``allowed`` defaults updated by ``options``; unknown names raise ``ValueError``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"method={method!r} got unknown option(s) {unknown}; allowed: {sorted(allowed)}"
        )
    out = dict(allowed)
    out.update(options)
    return out


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


def hparam_inputs(hparams: Sequence[Tensor] | Iterable[Tensor]) -> Vec:
    """The tensors to differentiate with respect to.

    An hparam that already requires grad is used as is (so closures may capture it, e.g.
    a module's own meta-parameters; ``torch.autograd.grad`` never writes ``.grad``); one
    that does not becomes a detached leaf that requires grad.
    """
    given = hparams if isinstance(hparams, Tensor) else tuple(hparams)
    checked = as_leaves(given, "hparams")
    return tuple(
        h if h.requires_grad else c.requires_grad_(True)
        for h, c in zip(given, checked, strict=True)
    )


def zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Vec:
    """``torch.autograd.grad(..., allow_unused=True)`` output with zeros for ``None``."""
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True))
