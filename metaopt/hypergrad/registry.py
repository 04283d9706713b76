"""Engines by name (Betty's string registry): learners and configs pick one with a string.

Each entry is an :class:`Engine` with a ``kind`` that fixes its call signature:

* ``kind="implicit"`` (``"exact"``, ``"neumann"``, ``"cg"``, ``"closed_form"``):
  ``engine(inner_objective, outer_objective, params, hparams, **options)``, i.e.
  :func:`~metaopt.hypergrad.implicit_grad` with ``method`` fixed.
* ``kind="unrolled"`` (``"unroll"`` = reverse mode, ``"forward"``):
  ``engine(step, outer_objective, params, hparams, *, steps, truncate=None)``, i.e.
  :func:`~metaopt.hypergrad.unrolled_grad` with ``mode`` fixed.
* ``kind="higher"`` (``"higher"``): :func:`~metaopt.hypergrad.higher_grad`.

All return one tensor per hyperparameter and raise ``NonFiniteHypergradient``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from metaopt.hypergrad.higher_engine import higher_grad
from metaopt.hypergrad.implicit import implicit_grad
from metaopt.hypergrad.unrolled import unrolled_grad

__all__ = ["ENGINE_KINDS", "Engine", "available_engines", "get_engine", "register_engine"]

ENGINE_KINDS = ("implicit", "unrolled", "higher")


@dataclass(frozen=True)
class Engine:
    """A named hypergradient engine; call it like the function it wraps."""

    name: str
    kind: str
    fn: Callable[..., tuple[Tensor, ...]]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        return self.fn(*args, **kwargs)


_ENGINES: dict[str, Engine] = {}


def register_engine(name: str, fn: Callable[..., tuple[Tensor, ...]], *, kind: str) -> Engine:
    """Register ``fn`` under ``name`` (a new name; re-registering raises ``ValueError``)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind={kind!r}: allowed {list(ENGINE_KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: must be a non-empty string")
    if name in _ENGINES:
        raise ValueError(f"name={name!r}: an engine of that name is already registered")
    _ENGINES[name] = Engine(name, kind, fn)
    return _ENGINES[name]


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return _ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"engine={name!r}: allowed {available_engines()}") from None


def available_engines() -> list[str]:
    return sorted(_ENGINES)


for _method in ("exact", "neumann", "cg", "closed_form"):
    register_engine(_method, functools.partial(implicit_grad, method=_method), kind="implicit")
register_engine("unroll", functools.partial(unrolled_grad, mode="reverse"), kind="unrolled")
register_engine("forward", functools.partial(unrolled_grad, mode="forward"), kind="unrolled")
register_engine("higher", higher_grad, kind="higher")
