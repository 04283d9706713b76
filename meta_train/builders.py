"""Builders of the offline meta-learners: ``TrainConfig`` -> MetaMD / MetaSGD / MetaCurvature.

The pipeline's learner options map onto :class:`metaopt.learners.OuterConfig` fields of the
same meaning (``tasks_per_step`` = k, ``inner_steps`` = T, ``inner_lr`` = eta, ``meta_lr``,
``meta_optimizer``, ``rank``, ``seed``; ``engine`` when given). Anything else the learner
takes (``gamma``, ``k_lambda``, ``learn_scale``, ``engine_options``, ``family``, ...) comes
from ``--option KEY=VALUE`` / TOML ``[options]``; an unknown one is a bad-input error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meta_train.config import TrainConfig

__all__ = ["build_metacurvature", "build_metamd", "build_metasgd", "outer_fields"]


def outer_fields(config: TrainConfig, learner_cls: Any) -> dict[str, Any]:
    """The ``OuterConfig`` fields this run sets (the learner's defaults fill the rest)."""
    from metaopt.kron import FAMILIES, family_options
    from metaopt.learners import OuterConfig

    fields: dict[str, Any] = {
        "seed": config.seed,
        "tasks_per_step": config.tasks_per_step,
        "inner_steps": config.inner_steps,
        "inner_lr": config.inner_lr,
        "meta_lr": config.meta_lr,
        "meta_optimizer": config.meta_optimizer,
    }
    if config.engine:
        fields["engine"] = config.engine
    family = config.options.get("family", learner_cls.defaults.get("family", OuterConfig.family))
    if "rank" in family_options(family):
        fields["rank"] = config.rank
        target, fixed = FAMILIES.canonical(family)
        if "family" not in config.options and fixed.get("rank", config.rank) != config.rank:
            # --rank overrides the rank a learner's default alias fixes (rank1 -> lowrank)
            fields["family"] = target
    known = {f.name for f in dataclasses.fields(OuterConfig)}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise ValueError(
            f"options: {unknown} are not options of {learner_cls.__name__}; "
            f"allowed: {sorted(known - set(fields))}"
        )
    return {**fields, **config.options}


def _build(cls_name: str, config: TrainConfig, source: Any, device: str) -> Any:
    import metaopt.learners as learners

    cls = getattr(learners, cls_name)
    return cls(source, **outer_fields(config, cls))


def build_metamd(config: TrainConfig, source: Any, device: str) -> Any:
    """MetaMD (rank-1 Kronecker Bregman divergence, Neumann implicit hypergradients)."""
    return _build("MetaMD", config, source, device)


def build_metasgd(config: TrainConfig, source: Any, device: str) -> Any:
    """Meta-SGD (diagonal, truncated unrolled hypergradients)."""
    return _build("MetaSGD", config, source, device)


def build_metacurvature(config: TrainConfig, source: Any, device: str) -> Any:
    """Meta-Curvature (inverse-free Kronecker transform, unrolled hypergradients)."""
    return _build("MetaCurvature", config, source, device)
