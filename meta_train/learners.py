"""Learner registry: ``--learner NAME`` -> a builder of an OuterLearner.

A builder is ``build(config: TrainConfig, source, dist: Dist) -> learner`` where ``source``
is a ``TaskFamily``-like object (``sample(generator) -> Task``) or a list of ``Task`` objects
(a suite's training domains), and the learner implements the OuterLearner protocol of
``metaopt`` (``preconditioner``, ``step``, ``outer_step(rank=, world_size=, all_reduce=)``,
``state_dict()``, ``load_state_dict()``). A builder may be given lazily as
``"module:attribute"`` when it needs an optional dependency. An existing name raises
``ValueError`` unless ``replace=True``.

Users add their own::

    meta_train.register_learner("my-learner", build)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from metaopt.kron import KroneckerPreconditioner
from metaopt.registry import Registry

__all__ = [
    "LEARNERS",
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
        build: ``build(config, source, dist) -> OuterLearner`` (imported, when it was
            registered as a lazy ``"module:attribute"`` path).
        distributed: whether its outer steps split across ranks (online APO does not).
        description: one line for ``--help``.
    """

    name: str
    build: Callable[..., Any]
    distributed: bool = True
    description: str = ""

    def builder(self) -> Callable[..., Any]:
        return self.build


#: name -> builder; each entry's meta holds ``distributed`` and ``description``
LEARNERS: Registry[Callable[..., Any]] = Registry("learner")


def register_learner(
    name: str,
    build: Callable[..., Any] | str,
    *,
    distributed: bool = True,
    description: str = "",
    replace: bool = False,
) -> None:
    """Register ``build`` under ``name``; ``build`` may be a lazy ``"module:attribute"``
    path (for a learner that needs an optional dependency). An existing name raises
    ``ValueError`` unless ``replace=True``."""
    if not (callable(build) or isinstance(build, str)):
        raise ValueError(f"build={build!r}: must be callable or a 'module:attribute' string")
    LEARNERS.register(
        name, build, replace=replace, distributed=distributed, description=description
    )


def get_learner_spec(name: str) -> LearnerSpec:
    entry = LEARNERS.get(name)
    return LearnerSpec(entry.name, entry.obj, **entry.meta)


def available_learners() -> list[str]:
    return LEARNERS.available()
