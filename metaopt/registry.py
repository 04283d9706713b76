"""One name table type for every registry in metaopt, ``tasks``, ``meta_train`` and ``meta_test``.

A :class:`Registry` maps names to objects (classes, factories, functions, specs)::

    FAMILIES = Registry("family")

    @FAMILIES.register("lowrank")
    class LowRankFamily: ...

    FAMILIES.alias("rank1", "lowrank", rank=1)  # declared once, options included
    FAMILIES.get("rank1")  # Entry(name="rank1", obj=LowRankFamily, options={"rank": 1})

The rules are the same everywhere:

* **one duplicate policy**: registering a name (or alias) that exists raises ``ValueError``
  unless ``replace=True``;
* **aliases** are declared once, with fixed options that callers merge under their own
  (an alias's options win: ``rank1`` is always rank 1);
* **lazy targets** (``"module:attribute"`` strings) exist for entries whose code needs an
  optional dependency (``higher``, ``botorch``, ...); they are imported on first
  :meth:`Registry.get` and cached;
* unknown names are a ``ValueError`` that names the registry, the value and what is
  allowed (``available()``); so are unknown keyword options of a registered factory
  (:func:`check_options`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

__all__ = ["Entry", "Registry", "check_options", "import_target", "keyword_options"]

T = TypeVar("T")


def import_target(target: str, what: str) -> Any:
    """Import ``"module:attribute"``; ``ValueError`` naming ``what`` when it cannot be."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what}: {target!r} is not a 'module:attribute' path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{what}: lives in {module_name!r}, which cannot be imported ({err}); "
            "install the extra it needs"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None


def keyword_options(fn: Callable[..., Any], *, supplied: Collection[str] = ()) -> list[str] | None:
    """The keyword options ``fn`` takes, sorted, leaving out the ``supplied`` parameters
    (those the caller fills itself); ``None`` when ``fn`` takes ``**kwargs`` or has no
    signature to inspect (it checks its own options then)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(n for n, p in params.items() if p.kind in named and n not in supplied)


def check_options(
    fn: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    *,
    supplied: Collection[str] = (),
    hook: bool = False,
) -> None:
    """``ValueError`` naming ``what``, the ``options`` that ``fn`` cannot take and the ones it
    can (see :func:`keyword_options`), before ``fn`` is called. With ``hook=True``, ``fn``'s
    optional ``validate(**options)`` attribute then checks the values (engines and
    meta-objectives carry one)."""
    allowed = keyword_options(fn, supplied=supplied)
    unknown = [] if allowed is None else sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {unknown}; its options are {allowed}")
    validate = getattr(fn, "validate", None) if hook else None
    if validate is not None:
        validate(**options)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """What :meth:`Registry.get` returns: the resolved object and the alias's fixed options.

    Attributes:
        name: the name asked for (an alias stays itself).
        target: the registered name the alias points to (``name`` for a plain entry).
        obj: the registered object (a lazy target already imported).
        options: fixed keyword options of an alias (``{}`` for a plain entry).
        meta: free-form data given at registration (a description, a search space, ...).
    """

    name: str
    target: str
    obj: T
    options: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names -> objects, with aliases, one duplicate policy and lazy optional targets.

    Args:
        kind: what the entries are (``"family"``, ``"engine"``, ...); used in messages.
        normalize: maps a name before lookup and registration (e.g. ``str.lower``).
    """

    def __init__(self, kind: str, *, normalize: Callable[[str], str] | None = None) -> None:
        self.kind = kind
        self._normalize = normalize or (lambda s: s)
        self._objects: dict[str, T | str] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, tuple[str, dict[str, Any]]] = {}

    # --- registration ------------------------------------------------------------------
    def _key(self, name: object) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.kind} name={name!r}: must be a non-empty string")
        return self._normalize(name.strip())

    def _check_free(self, key: str, replace: bool) -> None:
        if not replace and (key in self._objects or key in self._aliases):
            raise ValueError(
                f"{self.kind} {key!r} is already registered; pass replace=True to replace it"
            )

    @overload
    def register(
        self, name: str, obj: None = None, *, replace: bool = False, **meta: Any
    ) -> Callable[[T], T]: ...

    @overload
    def register(
        self, name: str, obj: T | str, *, replace: bool = False, **meta: Any
    ) -> T | str: ...

    def register(
        self, name: str, obj: T | str | None = None, *, replace: bool = False, **meta: Any
    ) -> Any:
        """Register ``obj`` (or, without ``obj``, the decorated object) as ``name``.

        ``obj`` may be a ``"module:attribute"`` string, imported on first use (for entries
        that need an optional dependency). ``meta`` is stored with the entry. Registering
        an existing name raises ``ValueError`` unless ``replace=True``.
        """
        key = self._key(name)
        self._check_free(key, replace)

        def add(target: T | str) -> T | str:
            self._aliases.pop(key, None)
            self._objects[key] = target
            self._meta[key] = dict(meta)
            return target

        if obj is None:

            def deco(target: T) -> T:
                add(target)
                return target

            return deco
        return add(obj)

    def alias(self, name: str, target: str, *, replace: bool = False, **options: Any) -> None:
        """Make ``name`` mean ``target`` with fixed ``options`` (e.g. ``rank1`` = ``lowrank``
        with ``rank=1``)."""
        key, to = self._key(name), self._key(target)
        if to not in self._objects:
            raise ValueError(f"{self.kind} alias {key!r}: target {to!r} is not registered")
        self._check_free(key, replace)
        if key in self._objects:
            self._remove_entry(key)
        self._aliases[key] = (to, dict(options))

    def unregister(self, name: str) -> None:
        """Remove ``name``: an alias, or an entry together with the aliases that point to
        it; ``ValueError`` if it is not registered."""
        key = self._key(name)
        if key in self._aliases:
            del self._aliases[key]
        elif key in self._objects:
            self._remove_entry(key)
        else:
            raise ValueError(f"{self.kind} {key!r} is not registered")

    def _remove_entry(self, key: str) -> None:
        """Drop the entry ``key`` and its aliases (they would name nothing)."""
        del self._objects[key]
        del self._meta[key]
        for alias in [a for a, (to, _) in self._aliases.items() if to == key]:
            del self._aliases[alias]

    # --- lookup ------------------------------------------------------------------------
    def get(self, name: str) -> Entry[T]:
        """The entry for ``name`` (aliases resolved, lazy targets imported)."""
        key = self._key(name) if isinstance(name, str) and name.strip() else None
        if key is None or (key not in self._objects and key not in self._aliases):
            raise ValueError(f"{self.kind}={name!r} is unknown; choose one of {self.available()}")
        target, options = self._aliases.get(key, (key, {}))
        obj = self._objects[target]
        if isinstance(obj, str):
            obj = import_target(obj, f"{self.kind} {target!r}")
            self._objects[target] = obj
        return Entry(key, target, obj, dict(options), dict(self._meta[target]))  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> T:
        return self.get(name).obj

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name.strip():
            return False
        key = self._normalize(name.strip())
        return key in self._objects or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self._objects) + len(self._aliases)

    def available(self) -> list[str]:
        """Every registered name and alias, sorted."""
        return sorted([*self._objects, *self._aliases])

    def is_alias(self, name: str) -> bool:
        return self._key(name) in self._aliases

    def canonical(self, name: str) -> tuple[str, dict[str, Any]]:
        """``(target name, alias options)`` without importing anything."""
        key = self._key(name)
        if key in self._aliases:
            to, options = self._aliases[key]
            return to, dict(options)
        if key not in self._objects:
            raise ValueError(f"{self.kind}={name!r} is unknown; choose one of {self.available()}")
        return key, {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"
