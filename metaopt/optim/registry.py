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

Add your own with :func:`register_optimizer`. The names live in one
:class:`~metaopt.registry.Registry`, :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from metaopt.optim.hypergradient_descent import SGDHD, AdamHD
from metaopt.optim.kfac import EKFAC, KFAC
from metaopt.optim.l4 import L4
from metaopt.optim.shampoo import Shampoo
from metaopt.optim.sign import AddSign, PowerSign
from metaopt.registry import Registry

__all__ = ["OPTIMIZERS", "available_optimizers", "get_optimizer", "register_optimizer"]

Factory = Callable[..., torch.optim.Optimizer]
F = TypeVar("F", bound=Callable[..., torch.optim.Optimizer])

#: name -> optimizer factory; each entry's meta holds ``defaults`` and ``needs_model``
OPTIMIZERS: Registry[Factory] = Registry("optimizer", normalize=str.lower)


def register_optimizer(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    needs_model: bool = False,
    replace: bool = False,
) -> Callable[[F], F]:
    """Decorator that makes an optimizer class (or factory) reachable by ``name``.

    The decorated callable is called as ``factory(params, **hparams)`` (or
    ``factory(model, **hparams)`` when ``needs_model=True``, e.g. for optimizers that hook
    into layers). ``defaults`` are merged under the caller's hyperparameters. ``name`` is
    case-insensitive; an existing name raises ``ValueError`` unless ``replace=True``.

    Example::

        @register_optimizer("my-sgd", defaults={"lr": 0.05})
        class MySGD(torch.optim.SGD): ...

        opt = get_optimizer("my-sgd", model)
    """

    def decorate(factory: F) -> F:
        if not callable(factory):
            raise ValueError(f"register_optimizer({name!r}): {factory!r} is not callable")
        OPTIMIZERS.register(
            name,
            factory,
            replace=replace,
            defaults=dict(defaults or {}),
            needs_model=needs_model,
        )
        return factory

    return decorate


def available_optimizers() -> list[str]:
    """All registered names, sorted."""
    return OPTIMIZERS.available()


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
    entry = OPTIMIZERS.get(name)
    if entry.meta["needs_model"] and not isinstance(params_or_model, nn.Module):
        raise ValueError(
            f"params_or_model={type(params_or_model).__name__}: {entry.name!r} needs the "
            "nn.Module itself (it hooks into the layers), not bare parameters"
        )
    kwargs = {**entry.meta["defaults"], **hparams}
    if entry.meta["needs_model"]:
        return entry.obj(params_or_model, **kwargs)
    if isinstance(params_or_model, nn.Module):
        params_or_model = params_or_model.parameters()
    return entry.obj(params_or_model, **kwargs)


def _register_builtins() -> None:
    sgd, adam = torch.optim.SGD, torch.optim.Adam
    builtins: list[tuple[str, Factory, dict[str, Any]]] = [
        ("sgd", sgd, {"lr": 0.1}),
        ("sgdm", sgd, {"lr": 0.01, "momentum": 0.9}),
        ("nesterov", sgd, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
        ("adam", adam, {"lr": 1e-3}),
        ("adamw", torch.optim.AdamW, {"lr": 1e-3}),
        ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3}),
        ("sgd-hd", SGDHD, {"lr": 0.1, "hypergrad_lr": 1e-3}),
        ("sgdm-hd", SGDHD, {"lr": 0.01, "momentum": 0.9, "nesterov": True, "hypergrad_lr": 1e-3}),
        ("adam-hd", AdamHD, {"lr": 1e-3, "hypergrad_lr": 1e-7}),
        ("l4-sgdm", L4, {"direction": "momentum"}),
        ("l4-adam", L4, {"direction": "adam"}),
        ("powersign", PowerSign, {"lr": 0.01}),
        ("addsign", AddSign, {"lr": 0.01}),
    ]
    for name, factory, defaults in builtins:
        register_optimizer(name, defaults=defaults)(factory)
    for name, cls in (("kfac", KFAC), ("ekfac", EKFAC), ("shampoo", Shampoo)):
        register_optimizer(name, needs_model=True)(cls)


_register_builtins()
