"""What APO can adapt: the :class:`Rule` interface and the ``ADAPTS`` registry.

A rule owns the meta-parameters ``phi`` (``meta_parameters()``, ``{name: nn.Parameter}``) and
maps ``(params, grads, states, meta)`` to the base step ``u(theta, phi, B)``: differentiable
in ``meta`` for the lookahead (``lookahead=True``), in place for the real update
(:meth:`Rule.apply_`). Every rule steps through the shared update kernels of
:mod:`metaopt.optim.update` (the ones the deployed optimizer runs); ``states`` maps each
parameter name to its rule state (:mod:`metaopt.optim.rules`). The lookahead of SGD with
momentum leaves momentum out, which is applied on top of the adapted step (Bae et al. 2022,
earlier version, Eq. 18-19), and the lookahead never returns state.

Add an adapt by subclassing :class:`Rule` and registering it::

    @ADAPTS.register("my-adapt", bases=("sgdm", "adam"))
    class MyRule(Rule): ...
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.rules import UpdateRule, get_rule
from metaopt.optim.update import block_step, preconditioned_step
from metaopt.registry import Registry

__all__ = ["ADAPTS", "Rule", "base_rule", "meta_dtype", "meta_param", "scaled_lookahead"]

Params = Mapping[str, Tensor]
Step = tuple[dict[str, Tensor], dict[str, Any]]


def base_rule(cfg: Any, base: str) -> tuple[UpdateRule, dict[str, Any]]:
    """The update rule and its full hyperparameters (all but ``lr``) of APO's ``base``."""
    wd = cfg.weight_decay
    if base == "sgd":
        name, hp = "sgd", {"weight_decay": wd}
    elif base == "sgdm":
        name, hp = "sgdm", {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": wd}
    elif base == "rmsprop":
        name = "rmsprop"
        hp = {"alpha": cfg.alpha, "eps": cfg.eps, "eps_root": cfg.eps_root, "power": cfg.power,
              "weight_decay": wd}  # fmt: skip
    elif base == "adam":
        name = "adam"
        hp = {"betas": cfg.betas, "eps": cfg.eps, "eps_root": cfg.eps_root, "weight_decay": wd}
    else:
        raise ValueError(f"base={base!r}: must be one of 'sgd', 'sgdm', 'rmsprop', 'adam'")
    rule = get_rule(name)
    return rule, rule.hparams(hp)


def base_step(
    rule: UpdateRule,
    hp: Mapping[str, Any],
    params: Params,
    grads: Params,
    states: Mapping[str, Any],
    lr: Tensor | float,
    *,
    count: int,
    inplace: bool = False,
) -> Step:
    """One step of ``rule`` (no preconditioner) with learning rate ``lr``: functional
    (new tensors) or, with ``inplace=True``, in place on ``params`` and the state tensors
    (the real update). Parameters without a state yet start from ``rule.init``. Returns
    ``(params, states)``."""
    states = {n: states[n] if n in states else rule.init(params[n], hp) for n in grads}
    if not inplace:
        return preconditioned_step(params, grads, states, None, rule, hp, lr, count=count)
    names = list(grads)
    with torch.no_grad():
        new, new_states = block_step(
            None, None, [params[n] for n in names], [grads[n] for n in names],
            [states[n] for n in names], rule, dict(hp), lr, inplace=True, count=count,
        )  # fmt: skip
    return dict(zip(names, new, strict=True)), dict(zip(names, new_states, strict=True))


def init_states(rule: UpdateRule, hp: Mapping[str, Any], params: Params) -> dict[str, Any]:
    return {n: rule.init(p, hp) for n, p in params.items()}


def sgd_direction(weight_decay: float, params: Params, grads: Params) -> dict[str, Tensor]:
    """``g + weight_decay * theta``: SGD's (and SGDm's lookahead) step per unit lr."""
    if weight_decay == 0:
        return dict(grads)
    with torch.no_grad():
        return {n: g + weight_decay * params[n] for n, g in grads.items()}


class _ScaledStep(torch.autograd.Function):
    """``theta_i - s * d_i`` for a 0-dim ``s``; only ``s`` is differentiated.

    ``d/ds = -sum_i <v_i, d_i>``: one dot product per tensor in the backward pass, where
    autograd through ``theta - s * d`` would write ``s * d``, ``-v`` and ``v * d`` (three
    parameter-sized temporaries and their passes over memory)."""

    @staticmethod
    def forward(
        ctx: Any, s: Tensor, outs: list[Tensor], n: int, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        thetas, dirs = tensors[:n], tensors[n:]
        ctx.save_for_backward(*dirs)
        ctx.s_dtype = s.dtype
        for t, d, out in zip(thetas, dirs, outs, strict=True):
            torch.addcmul(t, d, s, value=-1, out=out)  # the kernels' tensor-lr op, into out
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *vs: Tensor | None) -> tuple[Tensor | None, ...]:
        dirs = ctx.saved_tensors
        total = None
        for v, d in zip(vs, dirs, strict=True):
            if v is None:
                continue
            acc = torch.promote_types(ctx.s_dtype, d.dtype)  # fp32 at least (bf16 models)
            dot = torch.dot(v.reshape(-1).to(acc), d.reshape(-1).to(acc))
            total = dot if total is None else total + dot
        grad_s = None if total is None else (-total).to(ctx.s_dtype)
        return (grad_s, None, None, *([None] * (2 * len(dirs))))


def scaled_lookahead(
    params: Params,
    directions: Params,
    groups: list[tuple[Tensor | float, list[str]]],
    buffers: dict[str, Tensor],
) -> dict[str, Tensor]:
    """theta' = theta - s_k d on each group ``(s_k, names)``, differentiable in the (0-dim)
    tensor ``s_k`` only: the lookahead of a rule that is linear in its learning rate(s).

    theta' is written into ``buffers`` (kept by the rule between meta steps: a fresh
    parameter-sized tensor per meta step costs page faults on CPU); it is valid until the
    next call."""
    out: dict[str, Tensor] = {}
    for s, names in groups:
        thetas = [params[n].detach() for n in names]
        dirs = [directions[n].detach() for n in names]
        if isinstance(s, Tensor) and s.requires_grad:
            outs = []
            for n, t in zip(names, thetas, strict=True):
                buf = buffers.get(n)  # s is 0-dim: theta' has theta's dtype
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = buffers[n] = torch.empty_like(t)
                outs.append(buf.detach())  # a fresh alias: autograd history is per call
            new = _ScaledStep.apply(s, outs, len(names), *thetas, *dirs)
        else:
            with torch.no_grad():
                new = tuple(
                    torch.addcmul(t, d, s, value=-1)
                    if isinstance(s, Tensor)
                    else t.add(d, alpha=-s)
                    for t, d in zip(thetas, dirs, strict=True)
                )
        out.update(zip(names, new, strict=True))
    return out


def meta_dtype(like: Tensor) -> torch.dtype:
    """Meta-parameters are at least fp32 (fp64 for an fp64 model, fp32 for bf16/fp16)."""
    return torch.promote_types(like.dtype, torch.float32)


def meta_param(value: float, like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value, dtype=meta_dtype(like), device=like.device))


class Rule(abc.ABC):
    """Base class: ``meta`` holds ``phi``; subclasses implement ``update`` and ``current``."""

    #: the preconditioner a rule learns (layer-lr, precond), else ``None``
    preconditioner: Any = None

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        self.cfg = cfg
        self.meta: dict[str, nn.Parameter] = {}
        self._floats: dict[str, tuple[tuple[int, int], float]] = {}
        self.buffers: dict[str, Tensor] = {}  # scratch of the lookahead (not state)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return self.meta

    def host_value(self, name: str, fn: Callable[[Tensor], Tensor]) -> float:
        """``float(fn(meta[name]))``, cached until ``meta[name]`` changes (its version
        counter moves with every in-place update: the meta-optimizer's, ``load_state_dict``'s).

        The one host sync happens on the step after a change, i.e. on meta steps, which
        sync anyway; plain steps then pass a Python number to the in-place step (one fused
        ``add_(alpha=-lr)`` pass per parameter, as ``torch.optim.SGD``)."""
        p = self.meta[name]
        key = (p._version, p.data_ptr())
        hit = self._floats.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._floats[name] = (key, float(fn(p.detach())))
        return hit[1]

    @abc.abstractmethod
    def update(
        self,
        params: Params,
        grads: Params,
        states: Mapping[str, Any],
        meta: Params,
        *,
        lookahead: bool,
        step: int,
    ) -> Step:
        """``(new params, new states)`` of the base step under ``meta``: differentiable in
        ``meta`` when ``lookahead`` (theta'(phi)), the real update otherwise. ``step`` is the
        training step (0-based)."""

    def lookahead(
        self, params: Params, grads: Params, states: Mapping[str, Any], meta: Params, *, step: int
    ) -> dict[str, Tensor]:
        """theta'(phi), differentiable in ``meta``: :meth:`update` with ``lookahead=True``
        (rules whose lookahead is linear in a scalar override it with
        :func:`scaled_lookahead`)."""
        return self.update(params, grads, states, meta, lookahead=True, step=step)[0]

    def apply_(
        self, params: Params, grads: Params, states: dict[str, Any], meta: Params, *, step: int
    ) -> dict[str, Any]:
        """The real update in place on ``params`` (the model's parameters); returns the new
        states. Default: :meth:`update` then copy; rules with an in-place path override it."""
        with torch.no_grad():
            new, new_states = self.update(params, grads, states, meta, lookahead=False, step=step)
            for n, p in params.items():
                p.copy_(new[n])
        return new_states

    @abc.abstractmethod
    def current(self, meta: Params) -> dict[str, Tensor]:
        """Adapted hyperparameters as 0-dim tensors (no host sync)."""

    @abc.abstractmethod
    def learned_optimizer(self, meta: Params) -> LearnedOptimizer:
        """The deployable optimizer these meta-parameters define."""

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Context for the meta-objective's extra forward/backward passes."""
        return contextlib.nullcontext()

    def after_step(self) -> None:  # noqa: B027  (an optional hook: most rules need none)
        """Called after every real update."""

    def reset_state(self) -> None:  # noqa: B027  (an optional hook: most rules need none)
        """Forget any update state the rule keeps itself (APO's ``reset_state``)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


#: what APO adapts, by ``adapt=`` name; ``meta["bases"]``: the base optimizers it accepts
ADAPTS: Registry[type[Rule]] = Registry("adapt")
