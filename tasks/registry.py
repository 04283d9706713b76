"""Name registry for tasks, task families and suites.

Built-in modules register their factories with the decorators below; users register their
own the same way::

    @tasks.register_task("my-task")
    def my_task(**options) -> tasks.Task: ...

Names with a ``prefix:`` (e.g. ``"uci:slice"``) resolve to the factory registered as
``"prefix:<name>"`` and receive the part after the colon as ``name=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from tasks.base import Task, TaskFamily, TaskSuite

__all__ = [
    "available",
    "get_family",
    "get_suite",
    "get_task",
    "register_family",
    "register_suite",
    "register_task",
]

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {"task": {}, "family": {}, "suite": {}}


def _register(kind: str, name: str) -> Callable[[F], F]:
    def deco(factory: F) -> F:
        for other, reg in _REGISTRIES.items():
            if name in reg and reg[name] is not factory:
                raise ValueError(f"name={name!r} is already registered as a {other}")
        _REGISTRIES[kind][name] = factory
        return factory

    return deco


def register_task(name: str) -> Callable[[F], F]:
    """Register ``factory(**options) -> Task`` under ``name``."""
    return _register("task", name)


def register_family(name: str) -> Callable[[F], F]:
    """Register ``factory(**options) -> TaskFamily`` under ``name``."""
    return _register("family", name)


def register_suite(name: str) -> Callable[[F], F]:
    """Register ``factory(**options) -> TaskSuite`` under ``name``."""
    return _register("suite", name)


def _lookup(kind: str, name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    reg = _REGISTRIES[kind]
    if name in reg:
        return reg[name], {}
    if ":" in name:
        prefix, rest = name.split(":", 1)
        key = f"{prefix}:<name>"
        if key in reg and rest:
            return reg[key], {"name": rest}
    for other, oreg in _REGISTRIES.items():
        if other != kind and (name in oreg or f"{name.split(':')[0]}:<name>" in oreg):
            raise ValueError(f"name={name!r} is a {other}, not a {kind}; use get_{other}()")
    raise ValueError(f"{kind}={name!r} is unknown; available {kind}s: {sorted(reg)}")


def _build(kind: str, name: str, options: dict[str, Any]) -> Any:
    """Call the factory; an option its signature cannot take is a ``ValueError`` listing the
    options it does take (factories with ``**options`` check their own)."""
    factory, extra = _lookup(kind, name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            allowed = sorted(p for p in params if p not in extra)
            raise ValueError(
                f"{kind} {name!r}: unknown option(s) {unknown}; its options are {allowed}"
            )
    from metaopt.cli_support import check_types

    try:  # a value of the wrong type (n_train="many") fails here, not deep inside
        check_types(factory, options)
    except ValueError as err:
        raise ValueError(f"{kind} {name!r} option {err}") from None
    return factory(**extra, **options)


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` (``"digits"``, ``"uci:slice"``, ...)."""
    return _build("task", name, options)


def get_family(name: str, **options: Any) -> TaskFamily:
    """Build the task family registered as ``name`` (``"meta-quadratics"``, ...)."""
    return _build("family", name, options)


def get_suite(name: str, **options: Any) -> TaskSuite:
    """Build the suite registered as ``name`` (``"rotated-digits"``, ...)."""
    return _build("suite", name, options)


def available() -> dict[str, list[str]]:
    """Every registered name: ``{"tasks": [...], "families": [...], "suites": [...]}``."""
    return {f"{k}s" if k != "family" else "families": sorted(v) for k, v in _REGISTRIES.items()}
