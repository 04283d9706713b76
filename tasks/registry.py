"""Name registry for tasks, task families and suites.

Built-in modules register their factories with the decorators below; users register their
own the same way::

    @tasks.register_task("my-task")
    def my_task(**options) -> tasks.Task: ...

Names with a ``prefix:`` (e.g. ``"uci:slice"``) resolve to the factory registered as
``"prefix:<name>"`` and receive the part after the colon as ``name=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from metaopt.registry import Registry, check_options
from tasks.base import Task, TaskFamily, TaskSuite

__all__ = [
    "TASK_FAMILIES",
    "SUITES",
    "TASKS",
    "available",
    "get_family",
    "get_suite",
    "get_task",
    "register_family",
    "register_suite",
    "register_task",
]

F = TypeVar("F", bound=Callable[..., Any])

#: name -> factory, one registry per kind; a name belongs to at most one kind
TASKS: Registry[Callable[..., Task]] = Registry("task")
TASK_FAMILIES: Registry[Callable[..., TaskFamily]] = Registry("family")
SUITES: Registry[Callable[..., TaskSuite]] = Registry("suite")
_KINDS: dict[str, Registry[Any]] = {"task": TASKS, "family": TASK_FAMILIES, "suite": SUITES}


def _register(kind: str, name: str, replace: bool) -> Callable[[F], F]:
    def deco(factory: F) -> F:
        for other, reg in _KINDS.items():
            if other != kind and name in reg:
                raise ValueError(f"name={name!r} is already registered as a {other}")
        _KINDS[kind].register(name, factory, replace=replace)
        return factory

    return deco


def register_task(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Register ``factory(**options) -> Task`` under ``name`` (an existing name raises
    ``ValueError`` unless ``replace=True``)."""
    return _register("task", name, replace)


def register_family(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Register ``factory(**options) -> TaskFamily`` under ``name`` (an existing name raises
    ``ValueError`` unless ``replace=True``)."""
    return _register("family", name, replace)


def register_suite(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Register ``factory(**options) -> TaskSuite`` under ``name`` (an existing name raises
    ``ValueError`` unless ``replace=True``)."""
    return _register("suite", name, replace)


def _lookup(kind: str, name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    reg = _KINDS[kind]
    if name in reg:
        return reg[name], {}
    if isinstance(name, str) and ":" in name:
        prefix, rest = name.split(":", 1)
        key = f"{prefix}:<name>"
        if key in reg and rest:
            return reg[key], {"name": rest}
    for other, oreg in _KINDS.items():
        if other != kind and (name in oreg or f"{str(name).split(':')[0]}:<name>" in oreg):
            raise ValueError(f"name={name!r} is a {other}, not a {kind}; use get_{other}()")
    raise ValueError(f"{kind}={name!r} is unknown; available {kind}s: {reg.available()}")


def _build(kind: str, name: str, options: dict[str, Any]) -> Any:
    """Call the factory; an option its signature cannot take is a ``ValueError`` listing the
    options it does take (factories with ``**options`` check their own)."""
    factory, extra = _lookup(kind, name)
    check_options(factory, options, f"{kind} {name!r}", supplied=extra)
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
    return {
        "tasks": TASKS.available(),
        "families": TASK_FAMILIES.available(),
        "suites": SUITES.available(),
    }
