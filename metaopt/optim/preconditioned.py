"""The deploy target: a learned preconditioner as an ordinary ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update. Works in place, block by block (``Family.accumulate_``), so the
        per-step cost is SGD-momentum's plus the family's small factor products."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self.preconditioner
        for group in self.param_groups:
            wd, mom, lr, nesterov = (
                group["weight_decay"],
                group["momentum"],
                group["lr"],
                group["nesterov"],
            )
            grads: dict[str, Tensor] = {}
            owners: dict[str, Tensor] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._names[p]
                grads[name] = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                owners[name] = p
            if not grads:
                continue
            bufs: dict[str, Tensor] = {}
            if mom != 0:
                for name, p in owners.items():
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs[name] = state["momentum_buffer"]
            # buf = mom * buf + P g (the decay folded into the family's own update, one pass
            # over the buffer fewer), or, without momentum, p -= lr * P g directly
            target, alpha, beta = (bufs, 1.0, mom) if mom != 0 else (owners, -lr, 1.0)
            heavy_ball = mom != 0 and not nesterov
            covered: set[str] = set()
            for view in pre.views:
                if view.weight not in grads:
                    continue
                pre.block(view).accumulate_(
                    view.column_blocks(target), view.column_blocks(grads), alpha, beta
                )
                if heavy_ball:  # p -= lr * buf while the block's buffer is still in cache
                    for name in view.params:
                        owners[name].add_(bufs[name], alpha=-lr)
                covered.update(view.params)
            rest = [n for n in owners if n not in covered]  # skipped parameters: identity
            for name in rest:
                if beta != 1.0:
                    target[name].mul_(beta)
                target[name].add_(grads[name], alpha=alpha)
            if heavy_ball and rest:
                torch._foreach_add_([owners[n] for n in rest], [bufs[n] for n in rest], alpha=-lr)
            elif nesterov:
                # p -= lr * (P g + mom * buf)
                for view in pre.views:
                    if view.weight in grads:
                        pre.block(view).accumulate_(
                            view.column_blocks(owners), view.column_blocks(grads), -lr
                        )
                for name in rest:
                    owners[name].add_(grads[name], alpha=-lr)
                names = list(owners)
                torch._foreach_add_(
                    [owners[n] for n in names], [bufs[n] for n in names], alpha=-lr * mom
                )
        return loss
