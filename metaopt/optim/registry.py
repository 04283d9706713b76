"""Optimizers by name: ``get_optimizer("adam-hd", model, lr=3e-4)``.

Every entry is a ``torch.optim.Optimizer`` factory plus the default hyperparameters the
name stands for (``sgdm`` is SGD with ``momentum=0.9``). Hyperparameters given to
:func:`get_optimizer` override the defaults and are passed straight to the constructor.

=============  ==========================================  ===========================
name           optimizer                                   defaults
=============  ==========================================  ===========================
``sgd``        ``torch.optim.SGD``                         ``lr=0.1``
``sgdm``       ``torch.optim.SGD``                         ``lr=0.01, momentum=0.9``
``nesterov``   ``torch.optim.SGD``                         ``lr=0.01, momentum=0.9,
                                                           nesterov=True``
``adam``       ``torch.optim.Adam``                        ``lr=1e-3``
``adamw``      ``torch.optim.AdamW``                       ``lr=1e-3`` (wd 0.01)
``rmsprop``    ``torch.optim.RMSprop``                     ``lr=1e-3``
``kfac``       ``metaopt.optim.kfac.KFAC``                 its own (needs the model)
``ekfac``      ``metaopt.optim.kfac.EKFAC``                its own (needs the model)
``shampoo``    ``metaopt.optim.shampoo.Shampoo``           its own (needs the model)
``sgd-hd``     :class:`~metaopt.optim.SGDHD`               ``lr=0.1, hypergrad_lr=1e-3``
``sgdm-hd``    :class:`~metaopt.optim.SGDHD` (SGDN-HD)     ``lr=0.01, momentum=0.9,
                                                           nesterov=True,
                                                           hypergrad_lr=1e-3``
``adam-hd``    :class:`~metaopt.optim.AdamHD`              ``lr=1e-3, hypergrad_lr=1e-7``
``l4-sgdm``    :class:`~metaopt.optim.L4` (momentum)       ``alpha=0.15`` (no lr)
``l4-adam``    :class:`~metaopt.optim.L4` (Adam)           ``alpha=0.15`` (no lr)
``powersign``  :class:`~metaopt.optim.PowerSign`           ``lr=0.01, base=e``
``addsign``    :class:`~metaopt.optim.AddSign`             ``lr=0.01, alpha=1``
=============  ==========================================  ===========================

Add your own with :func:`register_optimizer`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["available_optimizers", "get_optimizer", "register_optimizer"]

Factory = Callable[..., torch.optim.Optimizer]
F = TypeVar("F", bound=Callable[..., torch.optim.Optimizer])


@dataclass(frozen=True)
class _Entry:
    """One registered name: a factory (or a lazy ``"module:Attr"`` path) and its defaults."""

    target: Factory | str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_model: bool = False

    def resolve(self, name: str) -> Factory:
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise ImportError(
                f"optimizer {name!r} lives in {module_name!r}, which could not be imported: {err}"
            ) from err
        return getattr(module, attr)


_REGISTRY: dict[str, _Entry] = {}


def _add(name: str, entry: _Entry) -> None:
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"name={name!r}: must be a non-empty lower-case string")
    if name in _REGISTRY:
        raise ValueError(f"name={name!r}: already registered; pick another name")
    _REGISTRY[name] = entry


def register_optimizer(
    name: str, *, defaults: Mapping[str, Any] | None = None, needs_model: bool = False
) -> Callable[[F], F]:
    """Decorator that makes an optimizer class (or factory) reachable by ``name``.

    The decorated callable is called as ``factory(params, **hparams)`` (or
    ``factory(model, **hparams)`` when ``needs_model=True``, e.g. for optimizers that hook
    into layers). ``defaults`` are merged under the caller's hyperparameters.

    Example::

        @register_optimizer("my-sgd", defaults={"lr": 0.05})
        class MySGD(torch.optim.SGD): ...

        opt = get_optimizer("my-sgd", model)
    """
    if not isinstance(name, str):
        raise ValueError(f"name={name!r}: must be a string")
    key = name.strip().lower()

    def decorate(factory: F) -> F:
        if not callable(factory):
            raise ValueError(f"register_optimizer({name!r}): {factory!r} is not callable")
        _add(key, _Entry(factory, dict(defaults or {}), needs_model))
        return factory

    return decorate


def available_optimizers() -> list[str]:
    """All registered names, in registration order (torch's, second-order, adaptive, user)."""
    return list(_REGISTRY)


def get_optimizer(
    name: str, params_or_model: nn.Module | Iterable[Any], **hparams: Any
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: one of :func:`available_optimizers` (case-insensitive).
        params_or_model: an ``nn.Module`` (its ``.parameters()`` are optimized; the
            second-order ``kfac``/``ekfac``/``shampoo`` need the module itself), or an
            iterable of parameters / param-group dicts.
        **hparams: passed to the constructor; they override the name's defaults.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or bare parameters
            given to an optimizer that needs the model.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    entry = _REGISTRY.get(key)
    if entry is None:
        raise ValueError(
            f"name={name!r}: unknown optimizer; valid names: {', '.join(available_optimizers())}"
        )
    if entry.needs_model and not isinstance(params_or_model, nn.Module):
        raise ValueError(
            f"params_or_model={type(params_or_model).__name__}: {key!r} needs the "
            "nn.Module itself (it hooks into the layers), not bare parameters"
        )
    factory = entry.resolve(key)
    kwargs = {**entry.defaults, **hparams}
    if entry.needs_model:
        return factory(params_or_model, **kwargs)
    if isinstance(params_or_model, nn.Module):
        params_or_model = params_or_model.parameters()
    return factory(params_or_model, **kwargs)


def _register_builtins() -> None:
    sgd, adam = torch.optim.SGD, torch.optim.Adam
    _add("sgd", _Entry(sgd, {"lr": 0.1}))
    _add("sgdm", _Entry(sgd, {"lr": 0.01, "momentum": 0.9}))
    _add("nesterov", _Entry(sgd, {"lr": 0.01, "momentum": 0.9, "nesterov": True}))
    _add("adam", _Entry(adam, {"lr": 1e-3}))
    _add("adamw", _Entry(torch.optim.AdamW, {"lr": 1e-3}))
    _add("rmsprop", _Entry(torch.optim.RMSprop, {"lr": 1e-3}))
    _add("kfac", _Entry("metaopt.optim.kfac:KFAC", needs_model=True))
    _add("ekfac", _Entry("metaopt.optim.kfac:EKFAC", needs_model=True))
    _add("shampoo", _Entry("metaopt.optim.shampoo:Shampoo", needs_model=True))
    hd = "metaopt.optim.hypergradient_descent"
    _add("sgd-hd", _Entry(f"{hd}:SGDHD", {"lr": 0.1, "hypergrad_lr": 1e-3}))
    _add(
        "sgdm-hd",
        _Entry(
            f"{hd}:SGDHD", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "hypergrad_lr": 1e-3}
        ),
    )
    _add("adam-hd", _Entry(f"{hd}:AdamHD", {"lr": 1e-3, "hypergrad_lr": 1e-7}))
    _add("l4-sgdm", _Entry("metaopt.optim.l4:L4", {"direction": "momentum"}))
    _add("l4-adam", _Entry("metaopt.optim.l4:L4", {"direction": "adam"}))
    _add("powersign", _Entry("metaopt.optim.sign:PowerSign", {"lr": 0.01}))
    _add("addsign", _Entry("metaopt.optim.sign:AddSign", {"lr": 0.01}))


_register_builtins()
