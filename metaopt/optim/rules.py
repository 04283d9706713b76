"""Update rules: one kernel per rule, shared by deployment, meta-training and APO.

A rule turns a parameter's gradient into a step direction and keeps that parameter's
state (momentum, Adam's moments). The same kernel serves two callers:

* ``inplace=True``: the deployed optimizer (:class:`~metaopt.optim.Preconditioned`)
  updates the state tensors in place with the very ops ``torch.optim`` uses (``out=``
  pointing at the state), so with the identity preconditioner a step equals
  ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` / ``RMSprop`` (single-tensor, the CPU
  default) bit for bit;
* ``inplace=False``: meta-training and APO's lookahead get new tensors, differentiable in
  the gradient, the parameters and any tensor hyperparameter. ``sqrt`` there has a
  finite derivative at 0 (a zero second moment, e.g. a dead ReLU unit) and the same
  forward bits, so meta-training runs exactly the update that deployment runs.

Rules (``RULES``; defaults in brackets)::

    sgd       theta -= lr * d,  d = g (+ heavy-ball / Nesterov momentum)  [momentum 0]
    sgdm      sgd with momentum 0.9;   nesterov: sgd with Nesterov momentum 0.9
    adam      Kingma & Ba 2015, Alg. 1 (torch.optim.Adam)   [betas (0.9, 0.999), eps 1e-8]
    adamw     adam with decoupled weight decay (Loshchilov & Hutter 2019)  [weight_decay 0.01]
    rmsprop   Tieleman & Hinton 2012 (torch.optim.RMSprop; ``power`` rho of APO's RMSprop,
              Bae et al. 2022 earlier version, Eq. 21)                    [alpha 0.99, eps 1e-8]

Weight decay is L2 (added to the gradient, before any preconditioner) except for
``adamw``, whose decay shrinks the parameter itself.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metaopt.registry import Registry

__all__ = [
    "RULES",
    "AdamState",
    "Direction",
    "MomentumState",
    "RMSpropState",
    "UpdateRule",
    "get_rule",
    "state_from_dict",
]

Scalar = float | Tensor


class MomentumState(NamedTuple):
    """SGD's state (``torch.optim.SGD``'s ``momentum_buffer``; ``None`` without momentum)."""

    momentum_buffer: Tensor | None


class AdamState(NamedTuple):
    """Adam's state, named as in ``torch.optim.Adam`` (``step`` is a 0-dim float tensor)."""

    step: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor


class RMSpropState(NamedTuple):
    """RMSprop's state, named as in ``torch.optim.RMSprop``."""

    step: Tensor
    square_avg: Tensor
    momentum_buffer: Tensor | None


@dataclass(frozen=True)
class Direction:
    """A step ``theta -= step_size * num / denom`` (``denom=None``: ``num`` alone)."""

    num: Tensor
    denom: Tensor | None
    step_size: Scalar

    def tensor(self, *, reuse_denom: bool = False) -> Tensor:
        """``num / denom`` (the direction per unit step size). ``reuse_denom=True`` writes it
        into ``denom``, a temporary of the rule's in-place step, instead of a new tensor."""
        if self.denom is None:
            return self.num
        return torch.div(self.num, self.denom, out=self.denom if reuse_denom else None)

    def apply(self, param: Tensor, *, inplace: bool) -> Tensor:
        """``param - step_size * num / denom`` with ``torch.optim``'s ops."""
        s = self.step_size
        if isinstance(s, Tensor):  # a learned (differentiable) step size
            return _addcmul(param, self.tensor(), s, -1, inplace)
        if self.denom is None:
            return param.add_(self.num, alpha=-s) if inplace else param.add(self.num, alpha=-s)
        if inplace:
            return param.addcdiv_(self.num, self.denom, value=-s)
        return torch.addcdiv(param, self.num, self.denom, value=-s)


def _out(t: Tensor | None, inplace: bool) -> Tensor | None:
    """Where an op writes: the state tensor itself in place, a new tensor otherwise."""
    return t if inplace else None


def _addcmul(a: Tensor, b: Tensor, c: Scalar, value: float, inplace: bool) -> Tensor:
    if isinstance(c, Tensor):
        return torch.addcmul(a, b, c, value=value, out=_out(a, inplace))
    return torch.add(a, b, alpha=value * c, out=_out(a, inplace))


def _sqrt(x: Tensor, inplace: bool) -> Tensor:
    """``sqrt(x)``; functionally with derivative 0 (not inf) where ``x == 0``, same bits."""
    if inplace or not x.requires_grad:
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).sqrt(), 0)


def _is_zero(x: Scalar) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _value(name: str, value: Any, low: float, high: float = math.inf, closed: bool = True) -> None:
    if isinstance(value, Tensor):
        return  # a learned hyperparameter (APO): its range is the learner's business
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if closed else low < value) and value < high
    if not ok:
        bracket = "[" if closed else "("
        raise ValueError(f"{name}={value!r}: must be a number in {bracket}{low}, {high})")


class UpdateRule(abc.ABC):
    """One update rule: its hyperparameters, state and direction kernel.

    Args:
        **defaults: the rule's default hyperparameters (override the class's).
    """

    #: every hyperparameter and its default (subclasses set it)
    defaults: ClassVar[dict[str, Any]] = {}
    #: weight decay shrinks the parameter (AdamW) instead of joining the gradient (L2)
    decoupled_decay: ClassVar[bool] = False
    #: the per-parameter state (a NamedTuple named like ``torch.optim``'s state keys)
    state_type: ClassVar[type[Any]]

    def __init__(self, name: str, **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(type(self).defaults))
        if unknown:
            raise ValueError(f"rule {name!r}: unknown hyperparameters {unknown}")
        self.name = name
        self.hparam_defaults = {**type(self).defaults, **defaults}

    def hparams(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The full, validated hyperparameters: defaults, then ``overrides``."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.hparam_defaults))
        if unknown:
            raise ValueError(
                f"rule {self.name!r}: unknown hyperparameters {unknown}; "
                f"allowed: {sorted(self.hparam_defaults)}"
            )
        hp = {**self.hparam_defaults, **overrides}
        self.check(hp)
        return hp

    def check(self, hp: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad hyperparameter."""
        _value("weight_decay", hp["weight_decay"], 0.0)

    @abc.abstractmethod
    def init(self, param: Tensor, hp: Mapping[str, Any]) -> Any:
        """A fresh state for ``param`` (zeros, on its device and dtype)."""

    def decay(
        self, param: Tensor, grad: Tensor, hp: Mapping[str, Any], lr: Scalar, *, inplace: bool
    ) -> tuple[Tensor, Tensor]:
        """``(param, grad)`` after weight decay: ``grad + wd * param`` (L2), or
        ``param * (1 - lr * wd)`` for a decoupled rule (as ``torch.optim``)."""
        wd = hp["weight_decay"]
        if _is_zero(wd):
            return param, grad
        if self.decoupled_decay:
            factor = 1 - lr * wd
            return (param.mul_(factor) if inplace else param * factor), grad
        return param, grad.add(param, alpha=wd) if not isinstance(wd, Tensor) else grad + wd * param

    @abc.abstractmethod
    def direction(
        self,
        grad: Tensor,
        state: Any,
        hp: Mapping[str, Any],
        lr: Scalar,
        *,
        inplace: bool,
        count: int | None = None,
    ) -> tuple[Direction, Any]:
        """``(step, new state)`` for one parameter. ``count``: this step's number (1, 2,
        ...), known to functional callers; ``None`` reads it from the state (in place)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.hparam_defaults})"


class SGDRule(UpdateRule):
    """``torch.optim.SGD`` (dampening 0): ``buf = mu buf + g``; step ``buf`` (heavy ball,
    Polyak 1964) or ``g + mu buf`` (Nesterov, Sutskever et al. 2013)."""

    defaults: ClassVar[dict[str, Any]] = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    state_type = MomentumState

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        _value("momentum", hp["momentum"], 0.0, 1.0)
        if not isinstance(hp["nesterov"], bool):
            raise ValueError(f"nesterov={hp['nesterov']!r}: must be true or false")
        if hp["nesterov"] and _is_zero(hp["momentum"]):
            raise ValueError("nesterov=True: needs momentum > 0")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> MomentumState:
        # zeros, not torch's first-step copy of g: 0 * mu + g is g exactly
        buf = None if _is_zero(hp["momentum"]) else torch.zeros_like(param)
        return MomentumState(buf)

    def direction(self, grad, state, hp, lr, *, inplace, count=None):
        mu = hp["momentum"]
        if state.momentum_buffer is None:
            return Direction(grad, None, lr), state
        buf = state.momentum_buffer
        buf = torch.add(torch.mul(buf, mu, out=_out(buf, inplace)), grad, out=_out(buf, inplace))
        if not hp["nesterov"]:
            d = buf
        elif isinstance(mu, Tensor):
            d = grad + mu * buf
        else:
            d = grad.add(buf, alpha=mu)
        return Direction(d, None, lr), MomentumState(buf)


class AdamRule(UpdateRule):
    """``torch.optim.Adam`` (bias-corrected, Kingma & Ba 2015) with an optional ``eps_root``
    inside the square root (optax's ``scale_by_adam``): ``denom = sqrt(v + eps_root) /
    sqrt(1 - b2^t) + eps``; ``eps_root = 0`` (default) is ``torch.optim.Adam``."""

    defaults: ClassVar[dict[str, Any]] = {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "eps_root": 0.0,
        "weight_decay": 0.0,
    }
    state_type = AdamState

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        betas = hp["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: must be a pair (beta1, beta2)")
        _value("betas[0]", betas[0], 0.0, 1.0)
        _value("betas[1]", betas[1], 0.0, 1.0)
        _value("eps", hp["eps"], 0.0)
        _value("eps_root", hp["eps_root"], 0.0)

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> AdamState:
        step = torch.zeros((), dtype=_count_dtype(param), device=param.device)
        return AdamState(step, torch.zeros_like(param), torch.zeros_like(param))

    def direction(self, grad, state, hp, lr, *, inplace, count=None):
        b1, b2 = hp["betas"]
        step_t = state.step.add_(1) if inplace else state.step + 1
        m = torch.lerp(state.exp_avg, grad, 1 - b1, out=_out(state.exp_avg, inplace))
        v = torch.mul(state.exp_avg_sq, b2, out=_out(state.exp_avg_sq, inplace))
        v = torch.addcmul(v, grad, grad, value=1 - b2, out=_out(v, inplace))
        t = float(step_t) if count is None else count
        bias1 = 1 - b1**t
        bias2_sqrt = (1 - b2**t) ** 0.5
        v_root = v if _is_zero(hp["eps_root"]) else v + hp["eps_root"]
        if inplace:  # torch.optim.Adam's ops, on one temporary instead of two
            denom = v_root.sqrt().div_(bias2_sqrt).add_(hp["eps"])
        else:
            denom = _sqrt(v_root, inplace) / bias2_sqrt + hp["eps"]
        return Direction(m, denom, lr / bias1), AdamState(step_t, m, v)


class RMSpropRule(UpdateRule):
    """``torch.optim.RMSprop`` (not centered): ``v = alpha v + (1 - alpha) g^2``,
    ``d = g / ((v + eps_root)^power + eps)`` (``power`` 1/2 computed as ``sqrt``), then
    optional heavy-ball momentum on ``d``. ``power`` is rho of APO's RMSprop (Bae et al.
    2022, earlier version, Eq. 21). With a tensor ``power``, where ``v = 0`` the derivative
    in ``power`` is finite without ``eps_root`` (torch takes ``0 log 0`` as 0); the one in
    ``v`` (``power v^(power - 1)``, infinite for ``power < 1``) needs ``eps_root > 0``."""

    defaults: ClassVar[dict[str, Any]] = {
        "alpha": 0.99,
        "eps": 1e-8,
        "eps_root": 0.0,
        "momentum": 0.0,
        "power": 0.5,
        "weight_decay": 0.0,
    }
    state_type = RMSpropState

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        _value("alpha", hp["alpha"], 0.0, 1.0)
        _value("eps", hp["eps"], 0.0)
        _value("eps_root", hp["eps_root"], 0.0)
        _value("momentum", hp["momentum"], 0.0, 1.0)
        _value("power", hp["power"], 0.0, closed=False)

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> RMSpropState:
        step = torch.zeros((), dtype=_count_dtype(param), device=param.device)
        buf = None if _is_zero(hp["momentum"]) else torch.zeros_like(param)
        return RMSpropState(step, torch.zeros_like(param), buf)

    def direction(self, grad, state, hp, lr, *, inplace, count=None):
        alpha, mu, power = hp["alpha"], hp["momentum"], hp["power"]
        step_t = state.step.add_(1) if inplace else state.step + 1
        v = torch.mul(state.square_avg, alpha, out=_out(state.square_avg, inplace))
        v = torch.addcmul(v, grad, grad, value=1 - alpha, out=_out(v, inplace))
        v_root = v if _is_zero(hp["eps_root"]) else v + hp["eps_root"]
        avg = (
            _sqrt(v_root, inplace)
            if not isinstance(power, Tensor) and power == 0.5
            else v_root**power
        )
        avg = avg.add_(hp["eps"]) if inplace else avg + hp["eps"]  # torch's add_ in place
        if state.momentum_buffer is None:
            return Direction(grad, avg, lr), RMSpropState(step_t, v, None)
        buf = torch.mul(state.momentum_buffer, mu, out=_out(state.momentum_buffer, inplace))
        buf = torch.addcdiv(buf, grad, avg, out=_out(buf, inplace))
        return Direction(buf, None, lr), RMSpropState(step_t, v, buf)


def _count_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


class AdamWRule(AdamRule):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019; ``torch.optim.AdamW``)."""

    decoupled_decay = True


#: every update rule by name
RULES: Registry[UpdateRule] = Registry("rule", normalize=str.lower)
RULES.register("sgd", SGDRule("sgd"))
RULES.register("sgdm", SGDRule("sgdm", momentum=0.9))
RULES.register("nesterov", SGDRule("nesterov", momentum=0.9, nesterov=True))
RULES.register("adam", AdamRule("adam"))
RULES.register("adamw", AdamWRule("adamw", weight_decay=0.01))
RULES.register("rmsprop", RMSpropRule("rmsprop"))


def state_from_dict(saved: Mapping[str, Any]) -> Any:
    """The typed rule state whose fields are ``saved``'s keys (e.g. from a checkpoint)."""
    for state_type in (MomentumState, AdamState, RMSpropState):
        if set(state_type._fields) == set(saved):
            return state_type(**saved)
    raise ValueError(f"state: keys {sorted(saved)} are not the state of a registered rule")


def get_rule(name: str | UpdateRule) -> UpdateRule:
    """The rule registered as ``name`` (a rule instance passes through)."""
    return name if isinstance(name, UpdateRule) else RULES[name]
