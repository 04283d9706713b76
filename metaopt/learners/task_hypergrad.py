"""One task's contribution to an outer step: inner run + hypergradient through an engine.

For a task, a fresh initialisation ``theta_1`` (``task.make_model(init_seed)``) is trained
for ``T`` inner steps ``theta <- theta - eta * momentum(P g)`` (``P = M^{-1}`` for MetaMD's
families; :func:`metaopt.optim.functional.preconditioned_step`), then the meta-objective
``E`` is differentiated with respect to the preconditioner's meta-parameters:

* implicit engines (``"neumann"``, ``"closed_form"``, ``"cg"``, ``"exact"``; MetaMD Eq. 13):
  the inner run carries no graph; :func:`metaopt.hypergrad.implicit_grad` is applied to the
  rephrased inner objective ``F(theta, M) = B_M(theta || theta_1)`` at ``theta_T``, whose
  Hessian in ``theta`` is ``M`` itself, so ``"closed_form"`` passes the whole implicit term
  ``(d^2 B_M / d phi d theta)^T M^{-1} v`` in closed form
  (``KroneckerPreconditioner.bregman_inverse_mixed``: thin products, no Hessian product,
  no autograd graph of ``d_theta B_M``).
* unrolled engines (``"unroll"`` with ``truncate``, ``"forward"``): the true derivative of
  ``E`` through the (last) inner steps, :func:`metaopt.hypergrad.unrolled_grad`.

Engines see functions of tuples of tensors; the preconditioner is evaluated at the given
meta-parameters through ``metaopt.func.functional_forward`` on a thin wrapper, so forward
mode (dual tensors) and reverse mode both differentiate the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaopt import hypergrad
from metaopt.func import detached_params, functional_forward, loss_and_grads
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.config import OuterConfig
from metaopt.objectives.base import MetaContext, evaluate_meta_objective
from metaopt.optim.functional import preconditioned_step

__all__ = ["TaskResult", "bind_preconditioner", "task_hypergradient"]


class _Bound(nn.Module):
    """``forward(fn) = fn(self.pre)``: lets ``functional_call`` swap the meta-parameters."""

    def __init__(self, pre: KroneckerPreconditioner) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, fn: Callable[[KroneckerPreconditioner], Any]) -> Any:
        return fn(self.pre)


def bind_preconditioner(
    pre: KroneckerPreconditioner,
) -> Callable[[tuple[Tensor, ...], Callable[[KroneckerPreconditioner], Any]], Any]:
    """``call(hparams, fn)`` evaluates ``fn(pre)`` with ``pre``'s parameters replaced by
    ``hparams`` (in ``pre.named_parameters()`` order), differentiably."""
    names = [f"pre.{n}" for n, _ in pre.named_parameters()]
    forward = functional_forward(_Bound(pre))

    def call(hparams: tuple[Tensor, ...], fn: Callable[[KroneckerPreconditioner], Any]) -> Any:
        return forward(dict(zip(names, hparams, strict=True)), fn)  # type: ignore[arg-type]

    return call


@dataclass
class TaskResult:
    """Hypergradient (one tensor per meta-parameter) or ``None`` when the run was dropped."""

    grads: tuple[Tensor, ...] | None
    meta_objective: float
    final_loss: float
    reason: str = ""
    #: wall time of the engine call alone (CPU clock; on CUDA it includes queued work)
    engine_seconds: float = 0.0


def _finite(tensors: Mapping[str, Tensor] | tuple[Tensor, ...]) -> bool:
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return bool(torch.stack([torch.isfinite(t).all() for t in values]).all())


def task_hypergradient(
    task: Any,
    pre: KroneckerPreconditioner,
    config: OuterConfig,
    *,
    init_seed: int,
    data_seed: int,
    step: int,
) -> TaskResult:
    """Train ``task`` from ``task.make_model(init_seed)`` for ``T`` steps; return dE/dphi."""
    model = task.make_model(init_seed)
    forward = functional_forward(model)
    theta1 = detached_params(model)
    names = list(theta1)
    _check_architecture(pre, theta1)
    stream = task.train_batches(data_seed, batch_size=config.batch_size)
    meta_batch = next(task.train_batches(data_seed + 1, batch_size=config.batch_size))
    call = bind_preconditioner(pre)
    hparams = tuple(p.detach().requires_grad_(True) for p in pre.parameters())
    lr, mom = config.inner_lr, config.inner_momentum
    options = config.objective_options()
    before = {n: t.detach() for n, t in theta1.items()}

    def objective(params: tuple[Tensor, ...], hp: tuple[Tensor, ...]) -> Tensor:
        after = dict(zip(names, params[: len(names)], strict=True))

        def fn(p: KroneckerPreconditioner) -> Tensor:
            ctx = MetaContext(
                params_before=before,
                params_after=after,
                forward=forward,
                loss=task.loss,
                batch=meta_batch,
                preconditioner=p,
                step=step,
                extras={"task": task},
            )
            return evaluate_meta_objective(config.meta_objective, ctx, **options)

        return call(hp, fn)

    if config.implicit:
        theta_t, _ = _inner_run(task, forward, pre, theta1, stream, config)
        if not _finite(theta_t):
            return TaskResult(None, float("nan"), float("nan"), "non-finite inner run")
        params = tuple(theta_t[n].detach().requires_grad_(True) for n in names)

        def inner(ps: tuple[Tensor, ...], hp: tuple[Tensor, ...]) -> Tensor:
            return call(hp, lambda p: p.bregman(dict(zip(names, ps, strict=True)), before))

        engine_opts = dict(config.engine_options)
        if config.engine == "closed_form" and not {"inverse_hvp", "inverse_mixed"} & set(
            engine_opts
        ):

            def inverse_mixed(
                v: tuple[Tensor, ...], ps: tuple[Tensor, ...], hp: tuple[Tensor, ...]
            ) -> tuple[Tensor, ...]:
                # (d^2 B_M / d phi d theta)^T M^{-1} v in one call (hp holds the values of
                # pre's own parameters, which bregman_inverse_mixed reads)
                named = dict(zip(names, ps, strict=True))
                return pre.bregman_inverse_mixed(dict(zip(names, v, strict=True)), named, before)

            engine_opts["inverse_mixed"] = inverse_mixed
        clock = time.perf_counter()
        try:
            grads = hypergrad.implicit_grad(
                inner, objective, params, hparams, method=config.engine, **engine_opts
            )
        except hypergrad.NonFiniteHypergradient as err:
            return TaskResult(None, float("nan"), float("nan"), f"{err} (term {err.term!r})")
    else:
        # the first T - truncate steps carry no graph (truncate=None: all T are unrolled)
        keep = config.engine_options.get("truncate") or config.inner_steps
        keep = min(keep, config.inner_steps)
        theta_k, state_k = _inner_run(
            task, forward, pre, theta1, stream, config, steps=config.inner_steps - keep
        )
        n_state = len(names) if mom else 0
        forward_mode = config.engine == "forward"
        record: dict[str, tuple[Tensor, ...]] = {}
        # drawn up front: a stream's shuffling is random, which vmap (forward mode) forbids
        window = iter([next(stream) for _ in range(keep)])

        def step_fn(ps: tuple[Tensor, ...], hp: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            theta = dict(zip(names, ps[: len(names)], strict=True))
            state = {f"{n}:momentum": b for n, b in zip(names, ps[len(names) :], strict=False)}
            x, y = next(window)
            zero = None
            if forward_mode and y.is_floating_point():
                # torch 2.x: mse_loss's forward-over-reverse formula writes into the tangent
                # of whichever input has none (an immutable ZeroTensor) when the other has
                # one -- the target, in the engine's jvp steps; a materialised zero tangent
                # on both (+ 0 * hparam) avoids it and changes nothing
                zero = 0 * hp[0].reshape(-1)[0]
                y = y + zero.to(y.dtype)

            def loss(th: dict[str, Tensor]) -> Tensor:
                pred = forward(th, x)
                return task.loss(pred if zero is None else pred + zero.to(pred.dtype), y)

            # torch.func.grad: pure (forward mode transforms it) and differentiable by
            # reverse-mode autograd (second order through the step)
            g = torch.func.grad(loss)(theta)
            new, new_state = call(
                hp, lambda p: preconditioned_step(theta, g, p, state, lr=lr, momentum=mom)
            )
            out = tuple(new[n] for n in names)
            if n_state:
                out += tuple(new_state[f"{n}:momentum"] for n in names)
            record["last"] = out
            return out

        start = tuple(theta_k[n] for n in names)
        if n_state:
            start += tuple(
                state_k.get(f"{n}:momentum", torch.zeros_like(theta_k[n])) for n in names
            )
        clock = time.perf_counter()
        try:
            grads = hypergrad.unrolled_grad(
                step_fn,
                objective,
                start,
                hparams,
                steps=keep,
                mode="forward" if forward_mode else "reverse",
            )
        except hypergrad.NonFiniteHypergradient as err:
            return TaskResult(None, float("nan"), float("nan"), f"{err} (term {err.term!r})")
        theta_t = {n: _primal(t) for n, t in zip(names, record["last"][: len(names)], strict=True)}
        params = tuple(theta_t[n] for n in names)
        if not _finite(theta_t):
            return TaskResult(None, float("nan"), float("nan"), "non-finite inner run")
    engine_seconds = time.perf_counter() - clock
    grads = tuple(g.detach() for g in grads)
    if not _finite(grads):
        return TaskResult(None, float("nan"), float("nan"), "non-finite hypergradient")
    with torch.no_grad():
        value = objective(params, tuple(p.detach() for p in pre.parameters()))
        final = task.loss(forward(theta_t, meta_batch[0]), meta_batch[1])
    return TaskResult(grads, float(value), float(final), engine_seconds=engine_seconds)


def _inner_run(
    task: Any,
    forward: Callable[..., Tensor],
    pre: KroneckerPreconditioner,
    theta1: dict[str, Tensor],
    stream: Any,
    config: OuterConfig,
    steps: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``steps`` (default ``T``) preconditioned steps from ``theta1`` without any graph;
    returns ``(theta, optimizer state)``."""
    params = {n: t.detach().requires_grad_(True) for n, t in theta1.items()}
    state: dict[str, Tensor] = {}
    for _ in range(config.inner_steps if steps is None else steps):
        _, grads = loss_and_grads(forward, task.loss, params, next(stream))
        with torch.no_grad():
            params, state = preconditioned_step(
                params, grads, pre, state, lr=config.inner_lr, momentum=config.inner_momentum
            )
        params = {n: t.requires_grad_(True) for n, t in params.items()}
    return {n: t.detach() for n, t in params.items()}, {k: v.detach() for k, v in state.items()}


def _primal(t: Tensor) -> Tensor:
    """The plain value of ``t``: a tensor recorded inside a ``torch.func`` transform (forward
    mode) is a wrapper that must be unwrapped level by level."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t.detach()


def _check_architecture(pre: KroneckerPreconditioner, params: Mapping[str, Tensor]) -> None:
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    if shapes != pre.param_shapes:
        raise ValueError(
            f"task model: parameters {shapes} do not match the preconditioner's "
            f"{pre.param_shapes}; every task must use the same architecture"
        )
