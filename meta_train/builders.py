"""Builders of the offline meta-learners: ``TrainConfig`` -> MetaMD / MetaSGD / MetaCurvature.

The pipeline's learner settings map onto :class:`metaopt.MetaMDConfig` fields of the same
meaning (``tasks_per_step`` = k, ``inner_steps`` = T, ``inner_lr`` = ``lr``, ``meta_lr``,
``meta_optimizer``, ``engine``, ``rank`` = ``preconditioner_options["rank"]``, ``seed``),
each only when given: otherwise the preset's value stands (``--preset``, default the
learner's own). Any other field (``window``, ``rule``, ``compose``, ``engine_options``, ...)
comes from ``--option KEY=VALUE`` / TOML ``[options]``; an unknown one is a bad-input error.
"""

from __future__ import annotations

from typing import Any

from meta_train.config import TrainConfig

__all__ = ["build_metacurvature", "build_metamd", "build_metasgd", "learner_overrides"]

_FIELDS = {
    "tasks_per_step": "tasks_per_step",
    "inner_steps": "inner_steps",
    "inner_lr": "lr",
    "meta_lr": "meta_lr",
    "meta_optimizer": "meta_optimizer",
    "engine": "engine",
}


def learner_overrides(config: TrainConfig, preset: str) -> dict[str, Any]:
    """The :class:`~metaopt.MetaMDConfig` fields this run sets over ``preset``'s."""
    from metaopt.learners import PRESETS

    fields: dict[str, Any] = {"seed": config.seed}
    for ours, theirs in _FIELDS.items():
        value = getattr(config, ours)
        if value is not None:
            fields[theirs] = value
    options = dict(config.options)
    if config.rank is not None:
        base = options.get("preconditioner_options", PRESETS[preset].get("preconditioner_options"))
        options["preconditioner_options"] = {**(base or {"rank": 1}), "rank": config.rank}
    return {**fields, **options}


def _build(cls_name: str, config: TrainConfig, source: Any, device: str) -> Any:
    import metaopt.learners as learners

    cls = getattr(learners, cls_name)
    preset = config.preset or cls.default_preset
    return cls(source, preset=preset, **learner_overrides(config, preset))


def build_metamd(config: TrainConfig, source: Any, device: str) -> Any:
    """MetaMD with ``--preset`` (default ``kron-adamw``, the recipe that measures best)."""
    return _build("MetaMD", config, source, device)


def build_metasgd(config: TrainConfig, source: Any, device: str) -> Any:
    """Meta-SGD (per-parameter learning rates; the ``metasgd`` preset)."""
    return _build("MetaSGD", config, source, device)


def build_metacurvature(config: TrainConfig, source: Any, device: str) -> Any:
    """Meta-Curvature (inverse-free Kronecker transform; the ``metacurvature`` preset)."""
    return _build("MetaCurvature", config, source, device)
