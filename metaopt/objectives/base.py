"""Meta-objectives: scalar functions of one documented context, registered by name.

A meta-objective is ``fn(ctx: MetaContext, **options) -> Tensor`` (a scalar, differentiable
in whatever the learner differentiates: the preconditioner's meta-parameters, the adapted
hyperparameters, and ``ctx.params_after``). Both learners build the same context:

* APO (online): ``params_before`` = theta, ``params_after`` = theta'(phi) = u(theta, phi, B)
  (the one-step lookahead), ``batch`` = B, ``fsd_batch`` = B' (``None`` when no B' source
  was given, which APO allows only with ``lambda_fsd = 0`` and no ``fresh_loss_batch``).
* MetaMD (offline, per inner run): ``params_before`` = theta_1 (the run's initialisation),
  ``params_after`` = theta at the end of the window, ``batch`` = a training batch of the
  task, ``val_batch``, ``train_loss_mean`` and ``train_log_loss_mean``.

A field a learner cannot fill is ``None``; an objective that needs it raises ``ValueError``
through :meth:`MetaContext.require`. Users add objectives without touching library code::

    @metaopt.register_meta_objective("my-proximal")
    def my_proximal(ctx, lambda_wsd=1e-3):
        x, y = ctx.batch
        out = ctx.forward(ctx.params_after, x)
        return ctx.loss(out, y) + lambda_wsd / 2 * ctx.squared_distance()
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.registry import Registry, check_options

__all__ = [
    "OBJECTIVES",
    "MetaContext",
    "available_meta_objectives",
    "get_meta_objective",
    "register_meta_objective",
]

Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


@dataclass
class MetaContext:
    """Everything a meta-objective may look at.

    Attributes:
        params_before: ``{name: tensor}`` -- theta (APO) or theta_1 (MetaMD).
        params_after: ``{name: tensor}`` -- theta' (APO lookahead) or theta_T (MetaMD).
        forward: functional model, ``forward(params, x) -> output`` (``torch.func``).
        loss: ``loss(output, target) -> scalar`` (the task's training loss).
        batch: ``(x, y)``: APO's B (the gradient batch); MetaMD: a batch of the task.
        fsd_batch: ``(x, y)``: APO's B' for the output-space (FSD) term, else ``None``.
        preconditioner: the preconditioner being learned (MetaMD) or used (APO), or ``None``.
        step: the learner's step counter (APO: training step; MetaMD: outer step).
        extras: learner-specific additions. APO: ``"hparams"``, the meta-parameters
            ``phi`` by name as the meta-optimizer sees them, differentiable and mostly in log
            space (``log_lr``, ``log_eps``, ``rho_logit``, ``log_damping``,
            ``blocks.<layer>.log_scale``, ``blocks.<layer>.A``/``B``/``S``; the linear values that
            ``APO.hparam_log()`` reports are ``exp(log_lr)`` etc.), and with
            ``fresh_loss_batch`` ``"loss_batch"`` (B'). MetaMD: ``"task"``, the inner run's
            task.
        train_loss_mean: the mean training loss over the inner steps that led to
            ``params_after`` (MetaMD's window), differentiable; else ``None``.
        train_log_loss_mean: the mean of the log of those losses; else ``None``.
        val_batch: ``(x, y)`` from the task's validation split (MetaMD), else ``None``.
        rowwise: the model treats the rows of a batch independently (no batch norm or
            dropout in training mode), so :meth:`forward_rows` may run several batches as
            one concatenated batch (fewer, larger products; the same outputs).
    """

    params_before: Mapping[str, Tensor]
    params_after: Mapping[str, Tensor]
    forward: Forward | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    batch: tuple[Tensor, Tensor] | None = None
    fsd_batch: tuple[Tensor, Tensor] | None = None
    preconditioner: KroneckerPreconditioner | None = None
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    train_loss_mean: Tensor | None = None
    train_log_loss_mean: Tensor | None = None
    val_batch: tuple[Tensor, Tensor] | None = None
    rowwise: bool = False

    def require(self, *names: str) -> None:
        """Raise ``ValueError`` naming the first of ``names`` this context lacks, and which
        learner fills it (call it first thing in an objective, instead of unpacking
        ``None``)."""
        for name in names:
            if getattr(self, name) is None:
                hint = _FILLED_BY.get(name)
                raise ValueError(
                    f"meta-objective needs ctx.{name}, which this learner did not provide"
                    + (f" ({hint})" if hint else "")
                )

    def forward_rows(self, params: Mapping[str, Tensor], xs: list[Tensor]) -> list[Tensor]:
        """``[forward(params, x) for x in xs]``; one forward of ``cat(xs)`` split back into
        rows when :attr:`rowwise` (and the inputs' trailing shapes agree)."""
        self.require("forward")
        forward = self.forward
        assert forward is not None
        if not self.rowwise or len(xs) < 2 or len({tuple(x.shape[1:]) for x in xs}) != 1:
            return [forward(params, x) for x in xs]
        out = forward(params, torch.cat(xs))
        return list(out.split([x.shape[0] for x in xs]))

    def squared_distance(self) -> Tensor:
        """``||params_after - params_before||^2`` over all parameters."""
        total = None
        for n, after in self.params_after.items():
            d = (after - self.params_before[n]).pow(2).sum()
            total = d if total is None else total + d
        if total is None:
            raise ValueError("ctx.params_after is empty")
        return total


#: where each optional field comes from (the hint of :meth:`MetaContext.require`)
_FILLED_BY = {
    "fsd_batch": "APO fills it with B' on meta steps when it has a batch source: "
    "apo.step(batch, fsd_batch=batch_or_callable) or APO(..., fsd_data=iterator); "
    "MetaMD never does",
    "train_loss_mean": "MetaMD fills it (the window's mean training loss); APO does not",
    "train_log_loss_mean": "MetaMD fills it (the window's mean log training loss); APO does not",
    "val_batch": "MetaMD fills it from the task's validation split; APO does not",
    "preconditioner": "APO fills it for adapt='layer-lr' and 'precond'; MetaMD always",
}

MetaObjective = Callable[..., Tensor]
F = TypeVar("F", bound=MetaObjective)
#: name -> meta-objective function
OBJECTIVES: Registry[MetaObjective] = Registry("meta_objective")


def register_meta_objective(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn(ctx: MetaContext, **options) -> Tensor`` as ``name``.

    An existing name (``"proximal"``, ``"bregman-rate"``, ...) raises ``ValueError`` unless
    ``replace=True``, so a plugin cannot silently replace a learner's objective.
    """

    def deco(fn: F) -> F:
        OBJECTIVES.register(name, fn, replace=replace)
        return fn

    return deco


def get_meta_objective(name: str) -> MetaObjective:
    """The objective registered as ``name``; unknown names list the registered ones."""
    return OBJECTIVES[name]


def available_meta_objectives() -> list[str]:
    return OBJECTIVES.available()


def _check_scalar(value: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"meta-objective {name!r} must return a scalar tensor, got {value!r}")
    return value.reshape(())


def check_meta_objective(name: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``name`` is registered and ``options`` are keywords it takes
    (and its optional ``validate(**options)`` hook accepts them): what a learner checks at
    construction, before anything runs."""
    fn = get_meta_objective(name)
    supplied = tuple(inspect.signature(fn).parameters)[:1]  # the context
    check_options(fn, options, "objective_options", supplied=supplied, hook=True)


def evaluate_meta_objective(name: str, ctx: MetaContext, **options: Any) -> Tensor:
    """Look up ``name``, call it on ``ctx`` and check the result is a scalar tensor."""
    return _check_scalar(get_meta_objective(name)(ctx, **options), name)


__all__ += ["evaluate_meta_objective"]
