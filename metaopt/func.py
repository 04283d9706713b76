"""Functional evaluation of a model: the one place that calls ``torch.func.functional_call``.

Meta-learners differentiate through parameter updates, so they evaluate the model at
parameters that are *not* its own (``theta'(phi)``, ``theta_T``). Everything that needs
"the model's output / loss / gradient at these parameters" goes through these helpers::

    forward = functional_forward(model)           # forward(params, x) -> output
    loss, grads = loss_and_grads(forward, loss_fn, params, (x, y), create_graph=True)

Buffers (BatchNorm running statistics) are taken from the model; the helpers never copy
or modify the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "bind_parameters",
    "detached_params",
    "functional_forward",
    "loss_and_grads",
    "own_forward",
    "trainable_params",
]

Params = Mapping[str, Tensor]
Forward = Callable[[Params, Tensor], Tensor]


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` for every parameter with ``requires_grad`` (the model's own)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def detached_params(model: nn.Module, requires_grad: bool = True) -> dict[str, Tensor]:
    """Detached copies-by-reference of the trainable parameters (leaves of a new graph)."""
    return {n: p.detach().requires_grad_(requires_grad) for n, p in trainable_params(model).items()}


def functional_forward(model: nn.Module) -> Forward:
    """``forward(params, x) -> model output`` with ``params`` replacing the trainable ones.

    Parameters absent from ``params`` (frozen ones) and all buffers come from the model.
    """

    def forward(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, dict(params), (x,), strict=False)

    return forward


def own_forward(model: nn.Module) -> Forward:
    """``forward(params, x) -> model(x)`` for ``params`` that ARE the model's own trainable
    parameters (``trainable_params(model)``): the same computation as
    :func:`functional_forward` without swapping tensors into the module on every call
    (for real, non-lookahead training steps)."""

    def forward(params: Params, x: Tensor) -> Tensor:
        return model(x)

    return forward


def loss_and_grads(
    forward: Forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Params,
    batch: tuple[Tensor, Tensor],
    *,
    create_graph: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss on ``batch`` at ``params`` and its gradient ``{name: dL/dparam}``.

    With ``create_graph=True`` the gradients are differentiable (for unrolling through a
    step); otherwise they are detached. ``params`` must require grad.
    """
    x, y = batch
    loss = loss_fn(forward(params, x), y)
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    out = {
        n: (g if g is not None else torch.zeros_like(params[n]))
        for n, g in zip(names, grads, strict=True)
    }
    return (loss if create_graph else loss.detach()), out


class _Bound(nn.Module):
    """``forward(fn) = fn(self.inner)``: lets ``functional_call`` substitute a module's
    parameters around any function of the module, not only its ``forward``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.inner)


def bind_parameters(
    module: nn.Module,
) -> Callable[[Sequence[Tensor] | Mapping[str, Tensor], Callable[[nn.Module], Any]], Any]:
    """``call(params, fn)`` evaluates ``fn(module)`` with the module's parameters replaced by
    ``params`` (a sequence in ``module.named_parameters()`` order, or a name mapping),
    differentiably (reverse and forward mode): how a learner differentiates a function of a
    preconditioner with respect to its meta-parameters without touching the module."""
    names = [f"inner.{n}" for n, _ in module.named_parameters()]
    forward = functional_forward(_Bound(module))

    def call(
        params: Sequence[Tensor] | Mapping[str, Tensor], fn: Callable[[nn.Module], Any]
    ) -> Any:
        if isinstance(params, Mapping):
            mapping = {f"inner.{k}": v for k, v in params.items()}
        else:
            mapping = dict(zip(names, params, strict=True))
        return forward(mapping, fn)  # type: ignore[arg-type]

    return call
