"""Unroll a real ``torch.optim`` optimizer with ``higher`` and differentiate its hyperparameters.

For users who want the true multi-step hypergradient of their own training loop (any
optimizer ``higher`` supports: SGD, Adam, RMSprop, ...). ``higher.innerloop_ctx`` makes a
functional copy of the model and a differentiable copy of the optimizer whose
hyperparameters (``lr``, ``momentum``, ``weight_decay``, ``betas``...) are overridden by
tensors computed from ``hparams``; the model's own parameters and the optimizer's state
are not modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from metaopt.hypergrad._common import as_leaves, positive_int
from metaopt.hypergrad.errors import check_finite

__all__ = ["higher_grad"]

Override = Callable[[tuple[Tensor, ...]], Mapping[str, Tensor | Sequence[Tensor]]]


def higher_grad(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inner_loss: Callable[[nn.Module, int], Tensor],
    outer_loss: Callable[[nn.Module], Tensor],
    hparams: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    steps: int,
    override: Override | None = None,
) -> tuple[Tensor, ...]:
    """``d outer_loss(model after steps optimizer steps) / d hparams`` through ``higher``.

    Args:
        model: the network; optimizer: a ``torch.optim`` optimizer over its parameters.
        inner_loss: ``inner_loss(fmodel, t) -> 0-dim tensor``, the training loss of step
            ``t`` (draw the batch inside); ``fmodel`` is called like the model.
        outer_loss: ``outer_loss(fmodel) -> 0-dim tensor`` after the ``steps`` updates.
        hparams: tensors to differentiate, either a mapping ``{optimizer hyperparameter:
            tensor}`` used as is (e.g. ``{"lr": torch.tensor(0.1)}``), or a sequence with
            ``override``.
        override: ``override(hparams) -> {hyperparameter: value}`` where each value is a
            tensor (shared by all param groups) or a sequence with one tensor per param
            group, e.g. ``lambda h: {"lr": h[0].exp()}`` for a log learning rate.

    Returns:
        one detached tensor per hparam (mapping order for a mapping).
    """
    positive_int("steps", steps)
    if isinstance(hparams, Mapping):
        names = list(hparams)
        lam = tuple(t.requires_grad_(True) for t in as_leaves(list(hparams.values()), "hparams"))
        if override is None:

            def override(h: tuple[Tensor, ...]) -> Mapping[str, Tensor]:
                return dict(zip(names, h, strict=True))

    else:
        lam = tuple(t.requires_grad_(True) for t in as_leaves(hparams, "hparams"))
        if override is None:
            raise ValueError("override=None: a sequence of hparams needs an override callable")
    groups = len(optimizer.param_groups)
    ov: dict[str, list[Tensor]] = {}
    for key, value in override(lam).items():
        if any(key not in g for g in optimizer.param_groups):
            raise ValueError(
                f"override key {key!r}: not a hyperparameter of {type(optimizer).__name__} "
                f"(allowed: {sorted(k for k in optimizer.param_groups[0] if k != 'params')})"
            )
        vals = [value] if isinstance(value, Tensor) else list(value)
        if len(vals) not in (1, groups):
            raise ValueError(
                f"override {key!r}: {len(vals)} values for {groups} param groups "
                f"(give 1 or {groups})"
            )
        ov[key] = vals
    try:  # an optional dependency (the "higher" extra), imported on use
        import higher
    except ImportError as err:
        raise ValueError(
            f"higher_grad needs the higher package ({err}); pip install 'metaopt[higher]'"
        ) from None

    with higher.innerloop_ctx(
        model, optimizer, copy_initial_weights=True, override=ov, track_higher_grads=True
    ) as (fmodel, diffopt):
        for t in range(steps):
            diffopt.step(inner_loss(fmodel, t))
        value = outer_loss(fmodel)
        grads = torch.autograd.grad(value, lam, allow_unused=True)
    out = tuple(torch.zeros_like(h) if g is None else g for g, h in zip(grads, lam, strict=True))
    check_finite(out, "hypergradient")
    return out
