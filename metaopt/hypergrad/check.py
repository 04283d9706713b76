"""Check a hypergradient against central finite differences in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metaopt.hypergrad._common import as_leaves

__all__ = ["check_hypergradient", "finite_difference_grad"]


def finite_difference_grad(
    fn: Callable[[tuple[Tensor, ...]], Tensor],
    hparams: Sequence[Tensor],
    *,
    eps: float = 1e-5,
    indices: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int, float]]:
    """Central differences ``(f(h + eps e) - f(h - eps e)) / (2 eps)`` in float64.

    ``indices`` lists ``(hparam index, flat entry)`` pairs (default: every entry). Returns
    ``[(hparam index, flat entry, derivative)]``. ``fn`` is called with float64 copies.
    """
    base = [h.to(torch.float64).clone() for h in as_leaves(hparams, "hparams")]
    if indices is None:
        indices = [(i, j) for i, h in enumerate(base) for j in range(h.numel())]
    out = []
    for i, j in indices:
        values = []
        for sign in (1.0, -1.0):
            moved = [h.clone() for h in base]
            moved[i].view(-1)[j] += sign * eps
            values.append(float(fn(tuple(moved)).detach()))
        out.append((i, j, (values[0] - values[1]) / (2 * eps)))
    return out


def check_hypergradient(
    fn: Callable[[tuple[Tensor, ...]], Tensor],
    hparams: Sequence[Tensor],
    analytic: Sequence[Tensor],
    *,
    eps: float = 1e-5,
    max_entries: int | None = None,
    generator: torch.Generator | None = None,
    rel_floor: float = 1e-3,
) -> float:
    """Max relative error of ``analytic`` against central finite differences of ``fn``.

    For users writing a new meta-objective: write ``fn(hparams) -> scalar`` that runs the
    whole inner computation (e.g. the one-step lookahead and the meta-objective) from the
    hyperparameters, compute ``analytic`` with an engine, and check::

        err = check_hypergradient(fn, hparams, engine_grads)
        assert err < 1e-5

    Args:
        fn: ``fn(hparams) -> 0-dim tensor``; called with float64 copies of ``hparams``, so it
            must compute in float64 (cast its own data and parameters to the hparams'
            dtype) for the differences to be accurate.
        hparams: the point (sequence of tensors); analytic: one tensor per hparam.
        eps: finite-difference step (default ``1e-5``: truncation error ``O(eps^2)``, round-off
            ``O(1e-16 / eps)`` relative to ``|fn|``).
        max_entries: check only this many entries, drawn uniformly with ``generator``
            (default all); each entry costs two calls of ``fn``.
        rel_floor: entry ``i``'s error is ``|a_i - fd_i| / max(|fd_i|, rel_floor *
            max_j |fd_j|)``, so entries near zero are judged against the gradient's scale.

    Returns:
        the largest relative error over the checked entries (a float).
    """
    base = as_leaves(hparams, "hparams")
    ana = as_leaves(analytic, "analytic")
    if len(ana) != len(base) or any(a.shape != h.shape for a, h in zip(ana, base, strict=True)):
        raise ValueError(
            "analytic: expected shapes "
            f"{[tuple(h.shape) for h in base]}, got {[tuple(a.shape) for a in ana]}"
        )
    pairs = [(i, j) for i, h in enumerate(base) for j in range(h.numel())]
    if max_entries is not None and max_entries < len(pairs):
        pick = torch.randperm(len(pairs), generator=generator)[:max_entries]
        pairs = [pairs[k] for k in pick.tolist()]
    fd = finite_difference_grad(fn, base, eps=eps, indices=pairs)
    numeric = torch.tensor([d for _, _, d in fd], dtype=torch.float64)
    exact = torch.stack([ana[i].reshape(-1)[j].to(torch.float64).cpu() for i, j, _ in fd])
    scale = max(float(numeric.abs().max()), torch.finfo(torch.float64).tiny)
    denom = numeric.abs().clamp_min(rel_floor * scale)
    return float(((exact - numeric).abs() / denom).max())
