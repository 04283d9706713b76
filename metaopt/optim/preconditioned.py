"""The deploy target: a learned preconditioner as an ordinary ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.kron.families import Family
from metaopt.kron.layers import LayerView
from metaopt.kron.preconditioner import KroneckerPreconditioner

__all__ = ["Preconditioned"]


class Preconditioned(torch.optim.Optimizer):
    """``theta <- theta - lr * (momentum-smoothed) P (grad + weight_decay * theta)``.

    With the identity preconditioner this is exactly ``torch.optim.SGD`` (same momentum,
    Nesterov and weight-decay conventions, dampening 0). Weight decay is added to the
    gradient before preconditioning (L2 regularisation of the loss the mirror step sees).

    Args:
        params: ``model.named_parameters()`` (preferred), or the parameters in the order of
            ``model.named_parameters()``, or param-group dicts of either. Parameters are
            matched to the preconditioner's blocks by name (or by position).
        preconditioner: a :class:`~metaopt.kron.KroneckerPreconditioner` built for the model.
            It is applied without gradient tracking; its meta-parameters are not updated.
        lr: learning rate (``eta``).
        momentum: heavy-ball coefficient (default 0).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient (default 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        preconditioner: KroneckerPreconditioner,
        lr: float = 1e-2,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r}: must be a non-negative number")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in [0, 1)")
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r}: must be non-negative")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.preconditioner = preconditioner
        self._names = self._resolve_names(preconditioner)
        self._plans: dict[int, tuple[tuple[int, ...], _GroupPlan]] = {}

    def _resolve_names(self, pre: KroneckerPreconditioner) -> dict[Tensor, str]:
        """Map each parameter tensor to its name in the preconditioner."""
        names: dict[Tensor, str] = {}
        positional = [p for g in self.param_groups for p in g["params"]]
        given = [n for g in self.param_groups for n in g.get("param_names", [])]
        if given:
            pairs = list(zip(positional, given, strict=True))
        else:
            if len(positional) != len(pre.param_names):
                raise ValueError(
                    f"params: got {len(positional)} tensors but the preconditioner covers "
                    f"{len(pre.param_names)}; pass model.named_parameters()"
                )
            pairs = list(zip(positional, pre.param_names, strict=True))
        for p, n in pairs:
            if n not in pre.param_shapes:
                raise ValueError(f"params: {n!r} is not a parameter the preconditioner knows")
            if tuple(p.shape) != pre.param_shapes[n]:
                raise ValueError(
                    f"params: {n!r} has shape {tuple(p.shape)} but the preconditioner expects "
                    f"{pre.param_shapes[n]}"
                )
            names[p] = n
        return names

    def _plan(self, group: dict[str, Any]) -> _GroupPlan:
        """The group's parameters sorted into preconditioner blocks (cached per group)."""
        key = tuple(map(id, group["params"]))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        pre = self.preconditioner
        by_name = {self._names[p]: p for p in group["params"]}
        blocks, covered = [], set()
        for view in pre.views:
            present = [n for n in view.params if n in by_name]
            if not present:
                continue
            if len(present) != len(view.params):
                missing = sorted(set(view.params) - set(present))
                raise ValueError(
                    f"params: block {view.name!r} couples {list(view.params)} but {missing} "
                    "are not in the same param group; put a layer's weight and bias in one group"
                )
            blocks.append((pre.block(view), view, tuple(by_name[n] for n in view.params)))
            covered.update(view.params)
        rest = [p for n, p in by_name.items() if n not in covered]  # skipped: identity
        plan = _GroupPlan(blocks, rest)
        self._plans[id(group)] = (key, plan)
        return plan

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update. Works in place, block by block (``Family.accumulate_``), so the
        per-step cost is SGD-momentum's plus the family's small factor products."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plan = self._plan(group)
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            nesterov = group["nesterov"]
            for family, view, params in plan.blocks:
                if params[0].grad is None:
                    continue
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if wd != 0:
                    grads = [g.add(p, alpha=wd) for g, p in zip(grads, params, strict=True)]
                g_blocks = view.blocks_of(grads)
                if mom == 0:  # p -= lr * P g
                    family.accumulate_(view.blocks_of(params), g_blocks, -lr)
                    continue
                # buf = mom * buf + P g (the decay folded into the family's own update)
                bufs = [self._momentum_buffer(p) for p in params]
                family.accumulate_(view.blocks_of(bufs), g_blocks, 1.0, mom)
                if nesterov:  # p -= lr * (P g + mom * buf)
                    family.accumulate_(view.blocks_of(params), g_blocks, -lr)
                    for p, buf in zip(params, bufs, strict=True):
                        p.add_(buf, alpha=-lr * mom)
                else:  # p -= lr * buf while the block's buffer is still in cache
                    for p, buf in zip(params, bufs, strict=True):
                        p.add_(buf, alpha=-lr)
            for p in plan.rest:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if mom == 0:
                    p.add_(g, alpha=-lr)
                    continue
                buf = self._momentum_buffer(p)
                torch.add(g, buf, alpha=mom, out=buf)
                if nesterov:
                    p.add_(g, alpha=-lr).add_(buf, alpha=-lr * mom)
                else:
                    p.add_(buf, alpha=-lr)
        return loss


@dataclass
class _GroupPlan:
    """A param group's parameters as ``(family, view, params in view order)`` blocks plus
    the parameters the preconditioner skips (updated as plain SGD)."""

    blocks: list[tuple[Family, LayerView, tuple[Tensor, ...]]]
    rest: list[Tensor]
