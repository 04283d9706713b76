"""Learner registry: ``--learner NAME`` -> a builder of an OuterLearner.

A builder is ``build(config: TrainConfig, source, dist: Dist) -> learner`` where ``source``
is a ``TaskFamily``-like object (``sample(generator) -> Task``) or a list of ``Task`` objects
(a suite's training domains), and the learner implements the OuterLearner protocol of
``metaopt`` (``preconditioner``, ``step``, ``outer_step(rank=, world_size=, all_reduce=)``,
``state_dict()``, ``load_state_dict()``). Builders may be given lazily as
``"module:attribute"`` so that registering a learner imports nothing.

Users add their own::

    meta_train.register_learner("my-learner", build)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from metaopt.kron import KroneckerPreconditioner

__all__ = [
    "LearnerSpec",
    "OuterLearner",
    "available_learners",
    "get_learner_spec",
    "register_learner",
]


class OuterLearner(Protocol):
    """The outer-loop protocol shared by MetaMD, metasgd, metacurvature (and APO's adapter)."""

    preconditioner: KroneckerPreconditioner
    step: int

    def outer_step(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LearnerSpec:
    """A registered learner.

    Attributes:
        name: the ``--learner`` name.
        build: ``build(config, source, dist) -> OuterLearner`` or ``"module:attribute"``.
        distributed: whether its outer steps split across ranks (online APO does not).
        description: one line for ``--help``.
    """

    name: str
    build: Callable[..., Any] | str
    distributed: bool = True
    description: str = ""

    def builder(self) -> Callable[..., Any]:
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)


_LEARNERS: dict[str, LearnerSpec] = {}


def register_learner(
    name: str,
    build: Callable[..., Any] | str,
    *,
    distributed: bool = True,
    description: str = "",
) -> None:
    """Register ``build`` under ``name`` (replacing an earlier registration of that name)."""
    _LEARNERS[name] = LearnerSpec(name, build, distributed, description)


def get_learner_spec(name: str) -> LearnerSpec:
    if name not in _LEARNERS:
        raise ValueError(f"learner={name!r} is unknown; choose one of {available_learners()}")
    return _LEARNERS[name]


def available_learners() -> list[str]:
    return sorted(_LEARNERS)
