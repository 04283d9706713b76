"""The deploy target: a learned optimizer as an ordinary ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.kron.family_base import Family
from metaopt.kron.layers import LayerView
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.optim.rules import UpdateRule, get_rule
from metaopt.optim.update import block_step, check_compose

__all__ = ["Preconditioned"]


class Preconditioned(torch.optim.Optimizer):
    """A preconditioner composed with an update rule: ``theta -= lr * rule(P g)`` (or
    ``lr * P rule(g)``, see :mod:`metaopt.optim.update`).

    With ``preconditioner=None`` (or for parameters the preconditioner skips) each step is
    exactly ``torch.optim``'s (``rule="sgd"``: ``SGD``, ``"adam"``: ``Adam``, ``"adamw"``:
    ``AdamW``, ``"rmsprop"``: ``RMSprop``; bit for bit on CPU), so a preconditioner that
    starts at the identity starts from the hand-designed rule. Param groups, ``state_dict``
    (the state keys are ``torch.optim``'s), LR schedulers and closures work as usual.

    Args:
        params: ``model.named_parameters()`` (preferred), or the parameters in the order of
            ``model.named_parameters()``, or param-group dicts of either. Parameters are
            matched to the preconditioner's blocks by name (or by position).
        preconditioner: a :class:`~metaopt.kron.KroneckerPreconditioner` built for the
            model, or ``None``. It is applied without gradient tracking and not updated.
        lr: learning rate (default 1e-2).
        rule: ``"sgd"`` (default), ``"sgdm"``, ``"nesterov"``, ``"adam"``, ``"adamw"``,
            ``"rmsprop"`` or an :class:`~metaopt.optim.rules.UpdateRule`.
        compose: where ``P`` acts: ``"gradient"`` (default) or ``"direction"``.
        **hparams: the rule's hyperparameters (``momentum``, ``nesterov``, ``betas``,
            ``eps``, ``weight_decay``, ...; defaults from the rule).
    """

    def __init__(
        self,
        params: Iterable[Any],
        preconditioner: KroneckerPreconditioner | None = None,
        lr: float = 1e-2,
        *,
        rule: str | UpdateRule = "sgd",
        compose: str = "gradient",
        **hparams: Any,
    ) -> None:
        if preconditioner is not None and not isinstance(preconditioner, KroneckerPreconditioner):
            raise ValueError(
                f"preconditioner={preconditioner!r}: must be a KroneckerPreconditioner or None"
            )
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr >= 0.0:
            raise ValueError(f"lr={lr!r}: must be a non-negative number")
        self.rule = get_rule(rule)
        self.compose = check_compose(compose)
        defaults = {"lr": lr, **self.rule.hparams(hparams)}
        super().__init__(params, defaults)
        self.preconditioner = preconditioner
        self._names = self._resolve_names(preconditioner)
        self._plans: dict[int, tuple[tuple[int, ...], _GroupPlan]] = {}
        self._scratch: dict[Tensor, Tensor] = {}  # P g of the gradient path, reused (not state)

    def _resolve_names(self, pre: KroneckerPreconditioner | None) -> dict[Tensor, str]:
        """Map each parameter tensor to its name in the preconditioner."""
        positional = [p for g in self.param_groups for p in g["params"]]
        given = [n for g in self.param_groups for n in g.get("param_names", [])]
        if pre is None:
            return dict(zip(positional, given or map(str, range(len(positional))), strict=True))
        if given:
            pairs = list(zip(positional, given, strict=True))
        else:
            if len(positional) != len(pre.param_names):
                raise ValueError(
                    f"params: got {len(positional)} tensors but the preconditioner covers "
                    f"{len(pre.param_names)}; pass model.named_parameters()"
                )
            pairs = list(zip(positional, pre.param_names, strict=True))
        names: dict[Tensor, str] = {}
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "params" in param_group and hasattr(self, "_names"):
            raise ValueError(
                "add_param_group: a Preconditioned optimizer's parameters are matched to its "
                "preconditioner at construction; pass every group to the constructor"
            )
        hp = {k: v for k, v in param_group.items() if k in self.defaults and k != "lr"}
        if hp:
            self.rule.hparams(hp)  # a bad per-group value fails here, naming the field
        super().add_param_group(param_group)

    def _plan(self, group: dict[str, Any]) -> _GroupPlan:
        """The group's parameters sorted into preconditioner blocks (cached per group)."""
        key = tuple(map(id, group["params"]))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        pre = self.preconditioner
        by_name = {self._names[p]: p for p in group["params"]}
        blocks, covered = [], set()
        for view in pre.views if pre is not None else ():
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
        rest = [p for n, p in by_name.items() if n not in covered]  # P = I
        plan = _GroupPlan(blocks, rest)
        self._plans[id(group)] = (key, plan)
        return plan

    def _states(self, params: Iterable[Tensor], hp: dict[str, Any]) -> list[Any]:
        """The rule's typed state of each parameter (created on its first step). A step
        counter lives on the CPU, as ``torch.optim`` keeps it (not capturable, not fused):
        the rule reads it every step, which on an accelerator would wait for the device."""
        out = []
        for p in params:
            saved = self.state[p]
            if not saved:
                fresh = self.rule.init(p, hp)._asdict()
                if isinstance(fresh.get("step"), Tensor):  # zero, as every fresh state
                    fresh["step"] = torch.zeros_like(fresh["step"], device="cpu")
                saved.update(fresh)
            step = saved.get("step")
            if isinstance(step, Tensor) and step.device.type != "cpu":  # a loaded state
                saved["step"] = step.cpu()
            out.append(
                self.rule.state_type(**{k: saved.get(k) for k in self.rule.state_type._fields})
            )
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update, in place, block by block (:func:`metaopt.optim.update.block_step`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plan = self._plan(group)
            hp = {k: group[k] for k in self.rule.hparam_defaults}
            lr = group["lr"]
            for family, view, params in plan.blocks:
                if all(p.grad is None for p in params):
                    continue
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                self._step(family, view, list(params), grads, hp, lr)
            rest = [p for p in plan.rest if p.grad is not None]
            if rest:
                self._step(None, None, rest, [p.grad for p in rest], hp, lr)
        return loss

    def _step(
        self,
        family: Family | None,
        view: LayerView | None,
        params: list[Tensor],
        grads: list[Tensor],
        hp: dict[str, Any],
        lr: float,
    ) -> None:
        states = self._states(params, hp)
        scratch = None
        if family is not None and self.compose == "gradient":
            scratch = [self._scratch_for(p) for p in params]
        _, new_states = block_step(
            family,
            view,
            params,
            grads,
            states,
            self.rule,
            hp,
            lr,
            compose=self.compose,
            inplace=True,
            scratch=scratch,
        )
        for p, s in zip(params, new_states, strict=True):
            self.state[p].update(s._asdict())

    def _scratch_for(self, p: Tensor) -> Tensor:
        buf = self._scratch.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._scratch[p] = torch.empty_like(p)
        return buf


@dataclass
class _GroupPlan:
    """A param group's parameters as ``(family, view, params in view order)`` blocks plus
    the parameters the preconditioner skips (``P = I``)."""

    blocks: list[tuple[Family, LayerView, tuple[Tensor, ...]]]
    rest: list[Tensor]
