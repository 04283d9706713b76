"""Learner registry: ``--learner NAME`` -> a builder of a :class:`metaopt.MetaLearner`.

A builder is ``build(config: TrainConfig, source, device) -> learner`` where ``source`` is a
``TaskFamily``-like object (``sample(generator) -> Task``) or a list of ``Task`` objects (a
suite's training domains), and the learner satisfies :class:`metaopt.MetaLearner`
(``meta_step``, ``meta_steps``, ``history``, ``learned_optimizer``, ``state_dict``); the
pipeline uses nothing else. A builder may be given lazily as ``"module:attribute"`` when it
needs an optional dependency. An existing name raises ``ValueError`` unless ``replace=True``.

Users add their own (and reach the CLI with ``--import MODULE``)::

    meta_train.register_learner("my-learner", build)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metaopt.registry import Registry

__all__ = [
    "LEARNERS",
    "LearnerSpec",
    "available_learners",
    "get_learner_spec",
    "register_learner",
]


@dataclass
class LearnerSpec:
    """A registered learner.

    Attributes:
        name: the ``--learner`` name.
        build: ``build(config, source, device) -> MetaLearner`` (imported, when it was
            registered as a lazy ``"module:attribute"`` path).
        distributed: whether its meta-steps split across ranks (online APO's do not).
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
