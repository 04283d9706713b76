"""Optimizer specs: strings that name a way of training a task's model.

A spec resolves to a *builder* ``builder(spec, model, task, hparams) -> Trainer`` and a
:class:`~meta_test.space.SearchSpace` (what the hyperparameter search tunes for it).

Built-in specs:

- every name of :func:`metaopt.optim.available_optimizers` (``sgdm``, ``adam``, ``kfac``,
  ...), trained as an ordinary ``torch.optim`` loop; they tune learning rate x weight decay
  on the MetaMD appendix A.7 grids (L4 tunes ``alpha`` instead of ``lr``);
- ``learned:<path>``: a learned optimizer file (``metaopt.save_learned_optimizer``, what
  ``python -m meta_train`` writes) rebuilt on the task's model with its own rule and
  hyperparameters (:func:`metaopt.load_optimizer`). It tunes ``lr`` over the file's
  meta-trained lr times ``LEARNED_LR_FACTORS`` (the learned optimizer has tuned its own
  step scale; the search refines it on the same 5-point budget as every optimizer) x the
  weight-decay grid; ``learned:<path>?momentum=0.9`` deploys it with heavy-ball momentum;
- ``apo-lr:<base>``, ``apo-layer-lr:<base>``, ``apo-rmsprop-eps-rho``, ``apo-kfac-damping``,
  ``apo-precond``: built by :func:`meta_test.apo_specs.build`, searched over
  :func:`meta_test.apo_specs.search_space`.

Fixed hyperparameters: any spec may end in a query, ``SPEC?key=value&key=value`` (values
as in ``--task-option``: TOML, a bare word is a string), e.g. ``sgdm?momentum=0.5``,
``apo-precond?warmup=100``, ``adam?betas=[0.9,0.99]``. The fixed values reach the builder
on every trial and leave the spec's search space: a fixed hyperparameter that the space
also tunes is not tuned (``learned:<path>?lr=0.05`` trains at lr 0.05 and tunes only the
weight decay). Builders and search spaces see the spec without its query
(:func:`split_spec`); the query is part of the spec's name in the results, so
``sgdm?momentum=0.5`` and ``sgdm`` can be compared side by side.

Register your own with :func:`register_spec`; a name ending in ``:`` (or written
``"name:<arg>"``) is a prefix that matches every ``name:...`` spec. Registered names live in
one :class:`~metaopt.registry.Registry`, :data:`SPECS`; the optimizer names come from
:func:`metaopt.optim.available_optimizers`, and registering one of them (or any existing
spec) raises ``ValueError`` unless ``replace=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from meta_test import apo_specs
from meta_test.space import ADAM_LR_GRID, LR_GRID, WD_GRID, SearchSpace, lr_wd_space
from metaopt.cli_support import parse_options
from metaopt.registry import Registry, import_target

__all__ = [
    "APO_SPECS",
    "LEARNED_LR_FACTORS",
    "SPECS",
    "L4_ALPHA_GRID",
    "OptimizerTrainer",
    "Trainer",
    "available_specs",
    "build_trainer",
    "canonical_spec",
    "check_spec",
    "input_files",
    "register_spec",
    "search_space",
    "split_spec",
]

#: L4's step-size fraction grid (the L4 paper recommends 0.1-0.3; default 0.15).
L4_ALPHA_GRID = (0.05, 0.1, 0.15, 0.25, 0.5)


@runtime_checkable
class Trainer(Protocol):
    """One optimizer driving one model (the harness's only view of an optimizer)."""

    num_meta_parameters: int

    def step(
        self, batch: tuple[Tensor, Tensor], draw_batch: Callable[[], tuple[Tensor, Tensor]]
    ) -> Tensor:
        """One training step on ``batch``; returns the training loss on ``batch`` BEFORE the
        update (a 0-dim tensor). ``draw_batch()`` yields a fresh training batch on demand."""
        ...

    def hparam_log(self) -> dict[str, float]:
        """Adapted hyperparameters now (e.g. ``{"lr": 0.01}``); ``{}`` if none."""
        ...


Builder = Callable[[str, nn.Module, Any, dict[str, Any]], Trainer]
SpaceLike = SearchSpace | Callable[[str], SearchSpace] | str | None


class OptimizerTrainer:
    """A ``torch.optim.Optimizer`` as a :class:`Trainer`.

    ``step`` zeroes the gradients, computes ``task.loss(model(x), y)``, back-propagates and
    calls ``optimizer.step()`` (through a closure for optimizers that need the loss, L4
    and LBFGS). ``hparam_log`` reports the first group's ``lr`` (adapted by the
    hypergradient-descent optimizers) or L4's ``l4_step_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        optimizer: torch.optim.Optimizer,
        num_meta_parameters: int = 0,
    ) -> None:
        from metaopt.optim.l4 import L4

        self.model = model
        self.task = task
        self.optimizer = optimizer
        self.num_meta_parameters = int(num_meta_parameters)
        self._closure = isinstance(optimizer, L4 | torch.optim.LBFGS)

    def step(
        self, batch: tuple[Tensor, Tensor], draw_batch: Callable[[], tuple[Tensor, Tensor]]
    ) -> Tensor:
        x, y = batch
        if not self._closure:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            return loss.detach()
        first: list[Tensor] = []

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model(x), y)
            loss.backward()
            if not first:
                first.append(loss.detach())
            return loss

        self.optimizer.step(closure)
        return first[0]

    def hparam_log(self) -> dict[str, float]:
        group = self.optimizer.param_groups[0]
        if group["params"]:
            step = self.optimizer.state.get(group["params"][0], {}).get("l4_step_size")
            if step is not None:
                return {"l4_step_size": float(step)}
        lr = group.get("lr")
        if lr is None:
            return {}
        return {"lr": float(lr)}


@dataclass(frozen=True)
class _Spec:
    """A resolved spec: its builder and what it tunes (a lazy space already imported)."""

    builder: Builder
    space: SearchSpace | Callable[[str], SearchSpace] | None

    def search_space(self, spec: str) -> SearchSpace:
        if self.space is None:
            return SearchSpace()
        if isinstance(self.space, SearchSpace):
            return self.space
        return self.space(spec)


#: name or prefix (ending in ``:``) -> builder; each entry's meta holds its ``space``
SPECS: Registry[Builder] = Registry("spec", normalize=str.lower)


def _normalise(name_or_prefix: str) -> str:
    if not isinstance(name_or_prefix, str) or not name_or_prefix.strip():
        raise ValueError(f"name_or_prefix={name_or_prefix!r}: must be a non-empty string")
    key = name_or_prefix.strip().lower()
    if "<" in key:
        key = key.split("<", 1)[0]
        if not key.endswith(":"):
            raise ValueError(f"name_or_prefix={name_or_prefix!r}: write a prefix as 'name:<arg>'")
    return key


def register_spec(
    name_or_prefix: str,
    builder: Builder | str,
    *,
    search_space: SpaceLike = None,
    replace: bool = False,
) -> None:
    """Make ``name_or_prefix`` a valid optimizer spec.

    Args:
        name_or_prefix: an exact name (``"my-opt"``) or a prefix (``"my-opt:"`` or
            ``"my-opt:<arg>"``) that matches every ``"my-opt:..."`` spec.
        builder: ``builder(spec, model, task, hparams) -> Trainer``, or a lazy
            ``"module:attr"`` path imported on first use (for builders that need an optional
            dependency).
        search_space: a :class:`SearchSpace`, ``callable(spec) -> SearchSpace``, a lazy
            ``"module:attr"`` path to either, or ``None`` (nothing to tune).
        replace: allow re-registering an existing name (an optimizer name included).
    """
    key = _normalise(name_or_prefix)
    if not (callable(builder) or isinstance(builder, str)):
        raise ValueError(f"builder={builder!r}: must be callable or a 'module:attr' string")
    if not replace and key in _optimizer_names():
        raise ValueError(
            f"spec {key!r} is already registered (an optimizer of metaopt.optim); "
            "pass replace=True to replace it"
        )
    SPECS.register(key, builder, replace=replace, space=search_space)


def _optimizer_names() -> list[str]:
    from metaopt.optim import available_optimizers

    return available_optimizers()


def _display(key: str) -> str:
    return f"{key}<arg>" if key.endswith(":") else key


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sgdm?momentum=0.5&nesterov=true"`` -> ``("sgdm", {"momentum": 0.5, "nesterov":
    True})``: the spec without its query and the hyperparameters the query fixes (values
    parsed as :func:`metaopt.cli_support.parse_value`; ``{}`` without a query). The query
    starts at the first ``?``; ``&`` separates its items, so neither may appear in a value."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"optimizer spec={spec!r}: must be a non-empty string")
    name, _, query = spec.strip().partition("?")
    fixed = parse_options([q for q in query.split("&") if q.strip()], f"spec {spec.strip()!r}")
    return name.strip(), fixed


def _lookup(spec: str) -> _Spec:
    key, _ = split_spec(spec)
    low = key.lower()
    if not low.endswith(":") and low in SPECS:
        found = low
    elif ":" in key and key.split(":", 1)[1] and low.split(":", 1)[0] + ":" in SPECS:
        found = low.split(":", 1)[0] + ":"
    elif low in _optimizer_names():
        return _Spec(_optimizer_builder, _optimizer_space)
    else:
        raise ValueError(
            f"optimizer spec={spec!r} is unknown; valid specs: {', '.join(available_specs())}"
        )
    entry = SPECS.get(found)
    space = entry.meta["space"]
    if isinstance(space, str):
        space = import_target(space, f"spec {_display(found)!r} search space")
    return _Spec(entry.obj, space)


def available_specs() -> list[str]:
    """Every valid spec: the optimizer names, then registered names and prefixes."""
    names = _optimizer_names()
    return names + [_display(k) for k in SPECS.available() if k not in names]


def check_spec(spec: str) -> str:
    """``spec`` stripped, or ``ValueError`` listing the valid specs (or naming a bad query)."""
    _lookup(spec)
    return spec.strip()


def canonical_spec(spec: str) -> str:
    """The form shared by specs that train the same way (``SGD`` and ``sgd``): names and
    prefixes are case-insensitive, a prefix's argument (``learned:<path>``) and the query
    (``?momentum=0.5``) are kept."""
    name, sep, query = check_spec(spec).partition("?")
    head, colon, arg = name.partition(":")
    return head.lower() + colon + arg + sep + query


def input_files(spec: str) -> list[str]:
    """Files the spec reads (``learned:<path>`` -> ``[path]``), which no output may replace."""
    head, sep, arg = split_spec(spec)[0].partition(":")
    return [arg] if sep and head.lower() == "learned" and arg else []


def search_space(spec: str) -> SearchSpace:
    """The search space that ``spec`` declares, with its query's values fixed."""
    name, fixed = split_spec(spec)
    return _lookup(spec).search_space(name).fix(fixed)


def build_trainer(spec: str, model: nn.Module, task: Any, hparams: Mapping[str, Any]) -> Trainer:
    """Build the :class:`Trainer` that ``spec`` names for ``model`` on ``task``; the values
    fixed by the spec's query replace those of ``hparams``."""
    name, fixed = split_spec(spec)
    trainer = _lookup(spec).builder(name, model, task, {**hparams, **fixed})
    for attr in ("step", "hparam_log", "num_meta_parameters"):
        if not hasattr(trainer, attr):
            raise TypeError(f"spec={spec!r}: its builder returned {trainer!r} without {attr!r}")
    return trainer


# --- built-ins ---------------------------------------------------------------------------
def _optimizer_builder(spec: str, model: nn.Module, task: Any, hp: dict[str, Any]) -> Trainer:
    from metaopt.optim import get_optimizer

    return OptimizerTrainer(model, task, get_optimizer(spec.lower(), model, **hp))


def _optimizer_space(spec: str) -> SearchSpace:
    name = spec.lower()
    if name.startswith("l4-"):
        return lr_wd_space(L4_ALPHA_GRID, WD_GRID, lr_name="alpha")
    if name in ("adam", "adamw"):
        return lr_wd_space(ADAM_LR_GRID, WD_GRID)
    return lr_wd_space(LR_GRID, WD_GRID)


#: the ``learned:`` lr grid, relative to the file's meta-trained lr: steps of sqrt(2) around
#: it (the learned optimizer has learned its step scale; the search refines it, on the same
#: five-point budget as every other optimizer)
LEARNED_LR_FACTORS = (0.5, 2**-0.5, 1.0, 2**0.5, 2.0)


def _learned_builder(spec: str, model: nn.Module, task: Any, hp: dict[str, Any]) -> Trainer:
    from metaopt.io import load_optimizer

    hp = dict(hp)
    opt = load_optimizer(spec.split(":", 1)[1], model, hp.pop("lr", None), **hp)
    pre = opt.preconditioner  # a learned file always holds one
    return OptimizerTrainer(model, task, opt, num_meta_parameters=pre.num_meta_parameters())


def _learned_space(spec: str) -> SearchSpace:
    from metaopt.io import read_metadata

    meta = read_metadata(spec.split(":", 1)[1]).get("optimizer") or {}
    lr = float(meta.get("lr", 0.01))
    return lr_wd_space(tuple(lr * f for f in LEARNED_LR_FACTORS), WD_GRID)


APO_SPECS = ("apo-lr:", "apo-layer-lr:", "apo-rmsprop-eps-rho", "apo-kfac-damping", "apo-precond")

register_spec("learned:<path>", _learned_builder, search_space=_learned_space)
for _name in APO_SPECS:
    register_spec(_name, apo_specs.build, search_space=apo_specs.search_space)
