"""APO's adapts over the shared update kernels: ``lr``, ``layer-lr``, ``rmsprop-eps-rho``
and ``precond`` (``kfac-damping`` is in :mod:`metaopt.learners.apo.kfac`).

Each rule's real update goes through :mod:`metaopt.optim.update` (``precond``'s through a
:class:`~metaopt.optim.Preconditioned` optimizer, the deployed optimizer itself), and its
lookahead through the same kernels run functionally.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.func import bind_parameters
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.apo.adapts import (
    ADAPTS,
    Rule,
    base_rule,
    base_step,
    init_states,
    meta_dtype,
    meta_param,
    scaled_lookahead,
    sgd_direction,
)
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.rules import get_rule

__all__ = ["LayerLrRule", "LrRule", "PrecondRule", "RmspropEpsRhoRule"]

_LR_BASES = ("sgd", "sgdm", "rmsprop", "adam")


def _preconditioner(model: nn.Module, family: str, **options: Any) -> KroneckerPreconditioner:
    pre = KroneckerPreconditioner.for_model(model, family, **options)
    return pre.to(dtype=meta_dtype(next(model.parameters())))


@ADAPTS.register("lr", bases=_LR_BASES, lr_adapt=True)
class LrRule(Rule):
    """``adapt="lr"``: ``phi = log lr`` of any base."""

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        self.meta = {"log_lr": meta_param(math.log(cfg.lr), ref)}
        self.base, self.hp = base_rule(cfg, cfg.base)
        self.lookahead_base, self.lookahead_hp = base_rule(
            cfg, "sgd" if cfg.base == "sgdm" else cfg.base
        )

    def update(self, params, grads, states, meta, *, lookahead, step):
        lr = meta["log_lr"].exp()
        if lookahead:  # SGDm's lookahead is plain SGD: momentum acts on top (Eq. 18-19)
            empty = init_states(self.lookahead_base, self.lookahead_hp, params)
            st = empty if self.cfg.base == "sgdm" else states
            return base_step(self.lookahead_base, self.lookahead_hp, params, grads, st, lr,
                             count=step + 1)  # fmt: skip
        return base_step(self.base, self.hp, params, grads, states, lr, count=step + 1)

    def lookahead(self, params, grads, states, meta, *, step):
        if self.cfg.base not in ("sgd", "sgdm"):
            return super().lookahead(params, grads, states, meta, step=step)
        direction = sgd_direction(self.cfg.weight_decay, params, grads)
        groups = [(meta["log_lr"].exp(), list(params))]
        return scaled_lookahead(params, direction, groups, self.buffers)

    def apply_(self, params, grads, states, meta, *, step):
        lr = self.host_value("log_lr", torch.exp)
        return base_step(self.base, self.hp, params, grads, states, lr, count=step + 1,
                         inplace=True)[1]  # fmt: skip

    def current(self, meta):
        return {"lr": meta["log_lr"].detach().exp()}

    def learned_optimizer(self, meta):
        lr = float(meta["log_lr"].detach().exp())
        return LearnedOptimizer(None, self.cfg.base, _deploy_hp(self.cfg, self.hp), lr)


@ADAPTS.register("rmsprop-eps-rho", bases=("rmsprop",), lr_adapt=True)
class RmspropEpsRhoRule(Rule):
    """``adapt="rmsprop-eps-rho"``: ``phi = (log lr, log eps, logit rho)`` of
    ``theta -= lr g / ((v + eps_root)^rho + eps)`` (Bae et al. 2022, earlier version,
    Eq. 20-21); with ``cfg.fixed_lr`` only ``(log eps, logit rho)``, ``lr`` fixed
    (appendix D.7)."""

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        rho = cfg.power
        self.meta = {} if cfg.fixed_lr else {"log_lr": meta_param(math.log(cfg.lr), ref)}
        self.meta["log_eps"] = meta_param(math.log(cfg.eps), ref)
        self.meta["rho_logit"] = meta_param(math.log(rho / (1 - rho)), ref)
        self._lr = torch.tensor(cfg.lr, dtype=meta_dtype(ref), device=ref.device)
        self.base, self.hp = base_rule(cfg, "rmsprop")

    def _values(self, meta):
        lr = meta["log_lr"].exp() if "log_lr" in meta else self._lr
        return lr, meta["log_eps"].exp(), torch.sigmoid(meta["rho_logit"])

    def update(self, params, grads, states, meta, *, lookahead, step):
        lr, eps, rho = self._values(meta)
        hp = {**self.hp, "eps": eps, "power": rho}
        return base_step(self.base, hp, params, grads, states, lr, count=step + 1)

    def apply_(self, params, grads, states, meta, *, step):
        lr, eps, rho = self._values(meta)
        hp = {**self.hp, "eps": eps, "power": rho}
        return base_step(self.base, hp, params, grads, states, lr, count=step + 1, inplace=True)[1]

    def current(self, meta):
        lr, eps, rho = self._values({k: v.detach() for k, v in meta.items()})
        return {"lr": lr, "eps": eps, "rho": rho}

    def learned_optimizer(self, meta):
        lr, eps, rho = (float(v) for v in self._values({k: v.detach() for k, v in meta.items()}))
        hp = _deploy_hp(self.cfg, {**self.hp, "eps": eps, "power": rho})
        return LearnedOptimizer(None, "rmsprop", hp, lr)


@ADAPTS.register("layer-lr", bases=_LR_BASES, lr_adapt=True)
class LayerLrRule(Rule):
    """``adapt="layer-lr"``: ``lr_l = lr * exp(s_l)``, one ``s_l`` per layer view (the
    ``"scalar"`` family of :class:`~metaopt.kron.KroneckerPreconditioner`)."""

    def __init__(self, cfg: Any, model: nn.Module) -> None:
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
        self.base, self.hp = base_rule(cfg, cfg.base)
        self.lookahead_base, self.lookahead_hp = base_rule(
            cfg, "sgd" if cfg.base == "sgdm" else cfg.base
        )

    def _groups(self, meta):
        groups: list[tuple[Tensor | float, list[str]]]
        groups = [(meta[key].exp() * self.cfg.lr, names) for _, key, names in self.groups]
        if self.rest:
            groups.append((self.cfg.lr, self.rest))
        return groups

    def update(self, params, grads, states, meta, *, lookahead, step):
        rule, hp = (self.lookahead_base, self.lookahead_hp) if lookahead else (self.base, self.hp)
        if lookahead and self.cfg.base == "sgdm":
            states = init_states(rule, hp, params)
        new_params: dict[str, Tensor] = {}
        new_states: dict[str, Any] = {}
        for lr, names in self._groups(meta):
            sub = (
                {n: params[n] for n in names},
                {n: grads[n] for n in names},
                {n: states[n] for n in names if n in states},
            )
            out, st = base_step(rule, hp, *sub, lr, count=step + 1)
            new_params.update(out)
            new_states.update(st)
        return new_params, new_states

    def lookahead(self, params, grads, states, meta, *, step):
        if self.cfg.base not in ("sgd", "sgdm"):
            return super().lookahead(params, grads, states, meta, step=step)
        direction = sgd_direction(self.cfg.weight_decay, params, grads)
        return scaled_lookahead(params, direction, self._groups(meta), self.buffers)

    def apply_(self, params, grads, states, meta, *, step):
        for lr, names in self._groups(meta):
            sub = {n: params[n] for n in names}, {n: grads[n] for n in names}
            states = {**states, **base_step(self.base, self.hp, *sub, states, lr,
                                            count=step + 1, inplace=True)[1]}  # fmt: skip
        return states

    def current(self, meta):
        return {
            f"lr/{view}": meta[key].detach().exp() * self.cfg.lr for view, key, _ in self.groups
        }

    def learned_optimizer(self, meta):
        # lr_l = lr exp(s_l) is the scalar family's direction exp(s) d applied to the rule's
        # step d: the preconditioner on the direction
        hp = _deploy_hp(self.cfg, self.hp)
        return LearnedOptimizer(self.preconditioner, self.cfg.base, hp, self.cfg.lr,
                                compose="direction")  # fmt: skip


@ADAPTS.register("precond", bases=("sgdm", "adam"), lr_adapt=False)
class PrecondRule(Rule):
    """``adapt="precond"`` (APO-Precond): ``P`` of the ``"ekfac-shaped"`` family (the identity
    at the start).

    Lookahead ``theta - lr P g``; update ``theta - lr * precond_scale * P g`` (with
    ``precond_momentum``) by the deployed :class:`~metaopt.optim.Preconditioned` optimizer,
    after ``warmup`` steps of ``base`` at ``warmup_lr``.
    """

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.preconditioner = _preconditioner(model, "ekfac-shaped", **cfg.precond_options)
        self.meta = dict(self.preconditioner.named_parameters())
        self.warmup_base, self.warmup_hp = base_rule(cfg, cfg.base)
        self.lookahead_rule, self.lookahead_hp = base_rule(cfg, "sgd")
        self._call = bind_parameters(self.preconditioner)
        self.deployed = self.learned_optimizer(self.meta).build(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        )

    def update(self, params, grads, states, meta, *, lookahead, step):
        from metaopt.optim.update import preconditioned_step

        cfg = self.cfg
        if lookahead:
            states = init_states(self.lookahead_rule, self.lookahead_hp, params)
            return self._call(
                meta,
                lambda pre: preconditioned_step(
                    params, grads, states, pre, self.lookahead_rule, self.lookahead_hp, cfg.lr,
                    count=1,
                ),
            )  # fmt: skip
        raise AssertionError("APO-Precond's real update is apply_ (the deployed optimizer)")

    def apply_(self, params, grads, states, meta, *, step):
        """The warm-up's base step, then the deployed optimizer's own step on ``grads``."""
        cfg = self.cfg
        if step < cfg.warmup:
            return base_step(self.warmup_base, self.warmup_hp, params, grads, states,
                             cfg.warmup_lr, count=step + 1, inplace=True)[1]  # fmt: skip
        for n, p in params.items():
            p.grad = grads[n]
        try:
            self.deployed.step()
        finally:
            for p in params.values():
                p.grad = None
        return {}

    def current(self, meta):
        if not hasattr(self, "_lr"):  # created once: no host-to-device copy per step
            ref = next(iter(meta.values()))
            self._lr = torch.tensor(self.cfg.lr, dtype=ref.dtype, device=ref.device)
        return {"lr": self._lr}

    def learned_optimizer(self, meta):
        cfg = self.cfg
        momentum = cfg.precond_momentum
        hp = {"momentum": momentum, "weight_decay": cfg.weight_decay}
        return LearnedOptimizer(self.preconditioner, "sgdm" if momentum else "sgd", hp,
                                cfg.lr * cfg.precond_scale)  # fmt: skip

    def reset_state(self) -> None:
        self.deployed.state.clear()

    def extra_state(self) -> dict[str, Any]:
        # a copy: the optimizer's state_dict holds its live momentum buffers, which the
        # next steps update in place
        return {"deployed": copy.deepcopy(self.deployed.state_dict())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "deployed" in state:
            self.deployed.load_state_dict(state["deployed"])
            for group in self.deployed.param_groups:  # a resumed run may change lr
                group["lr"] = self.cfg.lr * self.cfg.precond_scale


def _deploy_hp(cfg: Any, hp: dict[str, Any]) -> dict[str, Any]:
    """A base's hyperparameters as the registered rule of the same name takes them."""
    rule = get_rule("sgdm" if cfg.base == "kfac" else cfg.base)
    return {k: v for k, v in hp.items() if k in rule.hparam_defaults}
