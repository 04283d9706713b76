"""APO's update rules ``u(theta, phi, B)``: one per ``adapt``, all built on
:mod:`metaopt.optim.functional` (the differentiable base steps).

A rule owns the meta-parameters ``phi`` (``meta_parameters()``, ``{name: nn.Parameter}``)
and maps ``(params, grads, state, meta)`` to ``(new_params, new_state)``. The same
function serves the differentiable lookahead (``lookahead=True``, ``meta`` the engine's
tensors) and the real update (``lookahead=False``, ``meta`` detached): the lookahead of
``sgdm`` and ``precond`` leaves momentum out, which is applied on top of the adapted step
(``001_`` Eq. 18-19), and the lookahead never returns state.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.func import functional_forward
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.apo_config import APOConfig
from metaopt.optim.functional import (
    adam_step,
    preconditioned_step,
    rmsprop_step,
    scaled_sub,
    sgd_step,
)
from metaopt.optim.inplace import adam_step_, rmsprop_step_, sgd_step_

__all__ = ["make_rule"]

Params = Mapping[str, Tensor]
Step = tuple[dict[str, Tensor], dict[str, Tensor]]


_FUNCTIONAL = {"sgd": sgd_step, "sgdm": sgd_step, "rmsprop": rmsprop_step, "adam": adam_step}
_IN_PLACE = {"sgd": sgd_step_, "sgdm": sgd_step_, "rmsprop": rmsprop_step_, "adam": adam_step_}


def _base_options(
    cfg: APOConfig, base: str, eps: Tensor | float | None, power: Tensor | float | None
) -> dict[str, Any]:
    """Hyperparameters of ``base`` other than ``lr`` (``eps``/``power`` override the config's
    for RMSprop, where APO adapts them)."""
    wd = cfg.weight_decay
    if base == "sgd":
        return {"weight_decay": wd}
    if base == "sgdm":
        return {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": wd}
    if base == "rmsprop":
        return {
            "alpha": cfg.alpha,
            "eps": cfg.eps if eps is None else eps,
            "eps_root": cfg.eps_root,
            "power": cfg.power if power is None else power,
            "weight_decay": wd,
        }
    if base == "adam":
        return {"betas": cfg.betas, "eps": cfg.eps, "eps_root": cfg.eps_root, "weight_decay": wd}
    raise ValueError(f"base={base!r}: must be one of {sorted(_FUNCTIONAL)}")


def base_step(
    cfg: APOConfig,
    base: str,
    params: Params,
    grads: Params,
    state: Params,
    lr: Tensor | float,
    *,
    lookahead: bool,
    eps: Tensor | float | None = None,
    power: Tensor | float | None = None,
) -> Step:
    """One step of ``base`` (``sgd | sgdm | rmsprop | adam``) with learning rate ``lr``.

    SGDm's lookahead is a plain SGD step: momentum is applied on top of the adapted step
    (APO's earlier version, Eq. 18-19)."""
    if base == "sgdm" and lookahead:
        return sgd_step(params, grads, None, lr=lr, weight_decay=cfg.weight_decay)
    options = _base_options(cfg, base, eps, power)
    if base == "sgd":
        state = None
    return _FUNCTIONAL[base](params, grads, state, lr=lr, **options)


def base_step_(
    cfg: APOConfig,
    base: str,
    params: Params,
    grads: Params,
    state: dict[str, Tensor],
    lr: Tensor | float,
    *,
    eps: Tensor | float | None = None,
    power: Tensor | float | None = None,
) -> None:
    """The real (non-lookahead) :func:`base_step`, in place on ``params`` and ``state``."""
    _IN_PLACE[base](params, grads, state, lr=lr, **_base_options(cfg, base, eps, power))


def _sgd_direction(cfg: APOConfig, params: Params, grads: Params) -> dict[str, Tensor]:
    """``g + weight_decay * theta``: SGD's (and SGDm's lookahead) step per unit lr."""
    if cfg.weight_decay == 0:
        return dict(grads)
    with torch.no_grad():
        return {n: g + cfg.weight_decay * params[n] for n, g in grads.items()}


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
            torch.addcmul(t, d, s, value=-1, out=out)  # scaled_sub's op, into ``out``
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
                new = tuple(scaled_sub(t, d, s) for t, d in zip(thetas, dirs, strict=True))
        out.update(zip(names, new, strict=True))
    return out


def meta_dtype(like: Tensor) -> torch.dtype:
    """Meta-parameters are at least fp32 (fp64 for an fp64 model, fp32 for bf16/fp16)."""
    return torch.promote_types(like.dtype, torch.float32)


def _param(value: float, like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value, dtype=meta_dtype(like), device=like.device))


def _preconditioner(model: nn.Module, family: str, **options: Any) -> KroneckerPreconditioner:
    pre = KroneckerPreconditioner.for_model(model, family, **options)
    return pre.to(dtype=meta_dtype(next(model.parameters())))


class Rule(abc.ABC):
    """Base class: ``meta`` holds ``phi``; subclasses implement ``update`` and ``current``."""

    preconditioner: KroneckerPreconditioner | None = None

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
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
        sync anyway; plain steps then pass a Python number to the in-place base step (one
        fused ``add_(alpha=-lr)`` pass per parameter, as ``torch.optim.SGD``)."""
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
        state: Params,
        meta: Params,
        *,
        lookahead: bool,
        step: int,
    ) -> Step:
        """``(new params, new state)`` of the base step under ``meta``: differentiable in
        ``meta`` when ``lookahead`` (theta'(phi)), the real update otherwise."""

    def lookahead(
        self, params: Params, grads: Params, state: Params, meta: Params, *, step: int
    ) -> dict[str, Tensor]:
        """theta'(phi), differentiable in ``meta``: :meth:`update` with ``lookahead=True``
        (rules whose lookahead is linear in a scalar override it with
        :func:`scaled_lookahead`)."""
        return self.update(params, grads, state, meta, lookahead=True, step=step)[0]

    def apply_(
        self, params: Params, grads: Params, state: dict[str, Tensor], meta: Params, *, step: int
    ) -> dict[str, Tensor]:
        """The real update in place on ``params`` (the model's parameters); returns the new
        state. Default: :meth:`update` then copy; rules with an in-place twin override it."""
        with torch.no_grad():
            new, new_state = self.update(params, grads, state, meta, lookahead=False, step=step)
            for n, p in params.items():
                p.copy_(new[n])
        return new_state

    @abc.abstractmethod
    def current(self, meta: Params) -> dict[str, Tensor]:
        """Adapted hyperparameters as 0-dim tensors (no host sync)."""

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Context for the meta-objective's extra forward/backward passes."""
        return contextlib.nullcontext()

    def after_step(self) -> None:  # noqa: B027  (an optional hook: most rules need none)
        """Called after every real update."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


class LrRule(Rule):
    """``adapt="lr"``: ``phi = log lr`` of any base."""

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        self.meta = {"log_lr": _param(math.log(cfg.lr), ref)}

    def update(self, params, grads, state, meta, *, lookahead, step):
        lr = meta["log_lr"].exp()
        return base_step(self.cfg, self.cfg.base, params, grads, state, lr, lookahead=lookahead)

    def lookahead(self, params, grads, state, meta, *, step):
        if self.cfg.base not in ("sgd", "sgdm"):
            return super().lookahead(params, grads, state, meta, step=step)
        direction = _sgd_direction(self.cfg, params, grads)
        groups = [(meta["log_lr"].exp(), list(params))]
        return scaled_lookahead(params, direction, groups, self.buffers)

    def apply_(self, params, grads, state, meta, *, step):
        lr = self.host_value("log_lr", torch.exp)
        base_step_(self.cfg, self.cfg.base, params, grads, state, lr)
        return state

    def current(self, meta):
        return {"lr": meta["log_lr"].detach().exp()}


class RmspropEpsRhoRule(Rule):
    """``adapt="rmsprop-eps-rho"``: ``phi = (log lr, log eps, logit rho)`` of
    ``theta -= lr g / ((v + eps_root)^rho + eps)`` (``001_`` Eq. 20-21); with
    ``cfg.fixed_lr`` only ``(log eps, logit rho)``, ``lr`` fixed (``000_`` D.7)."""

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        rho = cfg.power
        self.meta = {} if cfg.fixed_lr else {"log_lr": _param(math.log(cfg.lr), ref)}
        self.meta["log_eps"] = _param(math.log(cfg.eps), ref)
        self.meta["rho_logit"] = _param(math.log(rho / (1 - rho)), ref)
        self._lr = torch.tensor(cfg.lr, dtype=meta_dtype(ref), device=ref.device)

    def _values(self, meta: Params) -> tuple[Tensor, Tensor, Tensor]:
        lr = meta["log_lr"].exp() if "log_lr" in meta else self._lr
        return lr, meta["log_eps"].exp(), torch.sigmoid(meta["rho_logit"])

    def update(self, params, grads, state, meta, *, lookahead, step):
        lr, eps, rho = self._values(meta)
        return base_step(
            self.cfg, "rmsprop", params, grads, state, lr, lookahead=lookahead, eps=eps, power=rho
        )

    def apply_(self, params, grads, state, meta, *, step):
        lr, eps, rho = self._values(meta)
        base_step_(self.cfg, "rmsprop", params, grads, state, lr, eps=eps, power=rho)
        return state

    def current(self, meta):
        lr, eps, rho = self._values({k: v.detach() for k, v in meta.items()})
        return {"lr": lr, "eps": eps, "rho": rho}


class LayerLrRule(Rule):
    """``adapt="layer-lr"``: ``lr_l = lr * exp(s_l)``, one ``s_l`` per layer view (the
    ``"scalar"`` family of :class:`~metaopt.kron.KroneckerPreconditioner`)."""

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.preconditioner = _preconditioner(model, "scalar")
        self.meta = dict(self.preconditioner.named_parameters())
        # (view name, meta-parameter name, parameter names) per block
        self.groups = [
            (view.name, f"blocks.{key}.log_scale", list(view.params))
            for view, key in zip(
                self.preconditioner.views, self.preconditioner.blocks.keys(), strict=True
            )
        ]
        covered = {n for _, _, names in self.groups for n in names}
        self.rest = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]

    def update(self, params, grads, state, meta, *, lookahead, step):
        new_params: dict[str, Tensor] = {}
        new_state: dict[str, Tensor] = {}
        groups = [(meta[key].exp() * self.cfg.lr, names) for _, key, names in self.groups]
        if self.rest:
            groups.append((self.cfg.lr, self.rest))
        for lr, names in groups:
            sub_p = {n: params[n] for n in names}
            sub_g = {n: grads[n] for n in names}
            out, st = base_step(
                self.cfg, self.cfg.base, sub_p, sub_g, state, lr, lookahead=lookahead
            )
            new_params.update(out)
            new_state.update(st)
        return new_params, new_state

    def lookahead(self, params, grads, state, meta, *, step):
        if self.cfg.base not in ("sgd", "sgdm"):
            return super().lookahead(params, grads, state, meta, step=step)
        direction = _sgd_direction(self.cfg, params, grads)
        groups: list[tuple[Tensor | float, list[str]]]
        groups = [(meta[key].exp() * self.cfg.lr, names) for _, key, names in self.groups]
        if self.rest:
            groups.append((self.cfg.lr, self.rest))
        return scaled_lookahead(params, direction, groups, self.buffers)

    def current(self, meta):
        return {
            f"lr/{view}": meta[key].detach().exp() * self.cfg.lr for view, key, _ in self.groups
        }


class _Bound:
    """A preconditioner evaluated at given meta-parameters (``metaopt.func``)."""

    def __init__(self, preconditioner: KroneckerPreconditioner, meta: Params) -> None:
        self._forward = functional_forward(preconditioner)
        self._meta = meta

    def apply(self, grads: Params) -> dict[str, Tensor]:
        return self._forward(self._meta, grads)  # type: ignore[arg-type]


class PrecondRule(Rule):
    """``adapt="precond"`` (APO-Precond): ``P`` of the ``"ekfac"`` family (identity at start).

    Lookahead ``theta - lr P g``; update ``theta - lr * precond_scale * P g`` (with
    ``precond_momentum``), after ``warmup`` steps of ``base`` at ``warmup_lr``.
    """

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.preconditioner = _preconditioner(model, "ekfac", **cfg.precond_options)
        self.meta = dict(self.preconditioner.named_parameters())

    def update(self, params, grads, state, meta, *, lookahead, step):
        cfg = self.cfg
        if lookahead:
            return preconditioned_step(
                params,
                grads,
                _Bound(self.preconditioner, meta),
                None,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            )
        if step < cfg.warmup:
            return base_step(cfg, cfg.base, params, grads, state, cfg.warmup_lr, lookahead=False)
        return preconditioned_step(
            params,
            grads,
            self.preconditioner,
            {} if step == cfg.warmup else state,
            lr=cfg.lr * cfg.precond_scale,
            momentum=cfg.precond_momentum,
            weight_decay=cfg.weight_decay,
        )

    def apply_(self, params, grads, state, meta, *, step):
        """In place: the warm-up's base step, then (without momentum)
        ``theta -= lr * precond_scale * P (g + wd theta)`` through ``Family.accumulate_``
        (no direction or new parameter tensors; ``S^2`` cached between meta steps)."""
        cfg = self.cfg
        if step < cfg.warmup:
            base_step_(cfg, cfg.base, params, grads, state, cfg.warmup_lr)
            return state
        if cfg.precond_momentum:
            return super().apply_(params, grads, state, meta, step=step)
        pre = self.preconditioner
        assert pre is not None
        with torch.no_grad():
            g = _sgd_direction(cfg, params, grads)
            alpha = -cfg.lr * cfg.precond_scale
            covered: set[str] = set()
            for view in pre.views:
                if view.weight in g:
                    blocks = view.column_blocks(params)
                    pre.block(view).accumulate_(blocks, view.column_blocks(g), alpha)
                    covered.update(view.params)
            for n, p in params.items():
                if n not in covered:  # skipped parameters: P = I
                    p.add_(g[n], alpha=alpha)
        return {}

    def current(self, meta):
        if not hasattr(self, "_lr"):  # created once: no host-to-device copy per step
            ref = next(iter(meta.values()))
            self._lr = torch.tensor(self.cfg.lr, dtype=ref.dtype, device=ref.device)
        return {"lr": self._lr}


def make_rule(cfg: APOConfig, model: nn.Module) -> Rule:
    """The update rule for ``cfg.adapt``."""
    if cfg.adapt == "kfac-damping":
        from metaopt.learners.apo_kfac import KfacDampingRule

        return KfacDampingRule(cfg, model)
    rules: dict[str, type[Rule]] = {
        "lr": LrRule,
        "layer-lr": LayerLrRule,
        "rmsprop-eps-rho": RmspropEpsRhoRule,
        "precond": PrecondRule,
    }
    return rules[cfg.adapt](cfg, model)
