"""One duplicate policy for every name table: an existing name is refused unless replace=True.

Each case is a registry, a name it already holds and its public register function (called
with a fresh object). To add a registry (engines, APO rules and adapts, ...), append a
``Case`` to ``CASES``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import meta_train.builtin  # noqa: F401  (registers the built-in learners)
import tasks
from meta_test.specs import SPECS, register_spec
from meta_train.learners import LEARNERS, register_learner
from metaopt.hypergrad import ENGINES, register_engine
from metaopt.kron import FAMILIES, DiagFamily, register_family
from metaopt.learners import META_OPTIMIZERS, PRESETS
from metaopt.learners.apo import ADAPTS
from metaopt.learners.apo.rules import LrRule
from metaopt.objectives.base import OBJECTIVES, register_meta_objective
from metaopt.objectives.proximal import FSD_DIVERGENCES
from metaopt.optim.registry import OPTIMIZERS, register_optimizer
from metaopt.optim.rules import RULES, SGDRule
from metaopt.registry import Registry
from tasks.models import MODELS, register_model
from tasks.registry import SUITES, TASK_FAMILIES, TASKS


def _family(name: str, replace: bool) -> object:
    return register_family(name, type("_Family", (DiagFamily,), {}), replace=replace)


def _optimizer(name: str, replace: bool) -> object:
    return register_optimizer(name, replace=replace)(type("_SGD", (torch.optim.SGD,), {}))


def _objective(name: str, replace: bool) -> object:
    def objective(ctx: Any) -> torch.Tensor:
        return ctx.squared_distance()

    return register_meta_objective(name, replace=replace)(objective)


def _factory() -> Callable[..., Any]:
    def factory(**options: Any) -> Any:
        raise AssertionError("never built")

    return factory


def _spec(name: str, replace: bool) -> object:
    builder = _factory()
    register_spec(name, builder, replace=replace)
    return builder


def _learner(name: str, replace: bool) -> object:
    build = _factory()
    register_learner(name, build, replace=replace)
    return build


def _engine(name: str, replace: bool) -> object:
    return register_engine(name, _factory(), replace=replace)


def _rule(name: str, replace: bool) -> object:
    rule = SGDRule(name)
    RULES.register(name, rule, replace=replace)
    return rule


def _adapt(name: str, replace: bool) -> object:
    cls = type("_Rule", (LrRule,), {})
    ADAPTS.register(name, cls, replace=replace, bases=("sgd",))
    return cls


def _preset(name: str, replace: bool) -> object:
    recipe = {"lr": 0.5}
    PRESETS.register(name, recipe, replace=replace)
    return recipe


def _meta_optimizer(name: str, replace: bool) -> object:
    factory = _factory()
    META_OPTIMIZERS.register(name, factory, replace=replace)
    return factory


@dataclass(frozen=True)
class Case:
    registry: Registry[Any]
    existing: str
    register: Callable[[str, bool], object]  # (name, replace) -> the object registered


CASES = [
    Case(FAMILIES, "lowrank", _family),
    Case(FAMILIES, "rank1", _family),  # an alias
    Case(OPTIMIZERS, "sgd", _optimizer),
    Case(OPTIMIZERS, "SGDM", _optimizer),  # names are case-insensitive
    Case(OBJECTIVES, "proximal", _objective),
    Case(OBJECTIVES, "bregman-rate", _objective),
    Case(TASKS, "digits", lambda n, r: tasks.register_task(n, replace=r)(_factory())),
    Case(TASKS, "uci:<name>", lambda n, r: tasks.register_task(n, replace=r)(_factory())),
    Case(
        TASK_FAMILIES,
        "meta-quadratics",
        lambda n, r: tasks.register_family(n, replace=r)(_factory()),
    ),
    Case(SUITES, "rotated-digits", lambda n, r: tasks.register_suite(n, replace=r)(_factory())),
    Case(SPECS, "learned:<path>", _spec),
    Case(SPECS, "apo-precond", _spec),
    Case(SPECS, "adam", _spec),  # an optimizer name is a spec too
    Case(LEARNERS, "metamd", _learner),
    Case(ENGINES, "unroll", _engine),
    Case(ENGINES, "neumann", _engine),  # an alias of "implicit" with its solver fixed
    Case(RULES, "adam", _rule),
    Case(ADAPTS, "precond", _adapt),
    Case(PRESETS, "kron-adamw", _preset),
    Case(META_OPTIMIZERS, "adam", _meta_optimizer),
    Case(MODELS, "mlp", lambda n, r: register_model(n, _factory(), replace=r)),
    Case(FSD_DIVERGENCES, "kl", lambda n, r: FSD_DIVERGENCES.register(n, _factory(), replace=r)),
]


def _id(case: Case) -> str:
    return f"{case.registry.kind}:{case.existing}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_registering_an_existing_name_raises_and_keeps_the_entry(case: Case) -> None:
    key = case.existing.lower() if case.registry is OPTIMIZERS else case.existing
    key = key.split("<", 1)[0] if case.registry is SPECS else key
    before = case.registry.get(key) if key in case.registry else None
    with pytest.raises(ValueError, match="already registered"):
        case.register(case.existing, False)
    if before is not None:
        after = case.registry.get(key)
        assert after.obj is before.obj and after.options == before.options


@pytest.mark.parametrize("case", list({id(c.registry): c for c in CASES}.values()), ids=_id)
def test_replace_true_replaces(case: Case) -> None:
    name = f"test-duplicate-{case.registry.kind}"
    try:
        first = case.register(name, False)
        assert case.registry[name] is first
        with pytest.raises(ValueError, match=f"'{name}' is already registered"):
            case.register(name, False)
        assert case.registry[name] is first
        second = case.register(name, True)
        assert second is not first and case.registry[name] is second
    finally:
        if name in case.registry:
            case.registry.unregister(name)


def test_a_name_belongs_to_one_kind_of_task_registry() -> None:
    with pytest.raises(ValueError, match="'digits' is already registered as a task"):
        tasks.register_suite("digits", replace=True)(_factory())
    assert "digits" not in SUITES


def test_the_doc_pages_restore_every_registry_the_packages_define():
    """Every module-level ``NAME = Registry(...)`` of the packages (found by a text search of
    their source) is a table the doc-example harness (conftest.py) restores after a page, so
    a name a page registers never leaks into later tests."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_docs_conftest", root / "conftest.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    restored = {id(r) for r in harness._registries()}
    assignment = re.compile(r"^(\w+)(?::[^=\n]*)? = Registry\(", re.MULTILINE)
    defined = []
    for package in ("metaopt", "tasks", "meta_train", "meta_test"):
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for name in assignment.findall(path.read_text(encoding="utf-8")):
                defined.append((module.removesuffix(".__init__"), name))
    assert len(defined) >= 15  # TASKS, MODELS, FSD_DIVERGENCES, ...
    missing = [
        f"{module}.{name}"
        for module, name in defined
        if id(getattr(importlib.import_module(module), name)) not in restored
    ]
    assert missing == []
