"""MetaMD's configuration and its named presets (complete recipes).

One dataclass, validated in ``__post_init__``: a bad value, a value of another type than
its field's (or its family option's) annotation, an unknown family, rule, engine or
meta-objective, or an option that the family, the engine or the objective does not take
fails at construction with a message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from metaopt.cli_support import check_types
from metaopt.hypergrad.engines import ENGINES, check_engine
from metaopt.kron.families import FAMILIES, resolve_family
from metaopt.learners.base import META_OPTIMIZERS
from metaopt.objectives.base import check_meta_objective
from metaopt.optim.rules import get_rule
from metaopt.optim.update import check_compose
from metaopt.registry import Registry

__all__ = ["PRESETS", "MetaMDConfig", "preset_config"]

#: engines that differentiate the rephrased inner objective at the end of a whole inner run
_IMPLICIT = ("implicit",)


@dataclass
class MetaMDConfig:
    """Everything an offline meta-learner run is made of (defaults: the ``"kron-adamw"``
    preset, the recipe that measures best; see :data:`PRESETS`).

    Attributes:
        preset: the preset these values started from (recorded in files).
        preconditioner: the preconditioner family (``"lowrank"``, ``"rank1"``, ``"diag"``,
            ``"scalar"``, ``"ekfac-shaped"``, or a registered one). Every family starts at (or a
            hair from) the identity, so the learned optimizer starts as its ``rule``.
        preconditioner_options: the family's keyword options (``rank``, ``learn_scale``,
            ``init_scale``, ...).
        rule: the base update rule (``"adam"``, ``"sgd"``, ``"sgdm"``, ...).
        rule_options: the rule's hyperparameters other than the learning rate.
        compose: where the preconditioner acts: ``"gradient"`` or ``"direction"``.
        lr: the inner learning rate (``eta``; > 0).
        inner_steps: ``T``, the length of one inner run; a task's run restarts from a
            fresh initialisation after ``T`` steps (>= 1).
        window: steps per truncation: each meta-step advances every task's inner run by
            ``window`` steps and differentiates the objective of those steps (learned_
            optimization's truncated training). ``None``: the whole run (``T``).
        tasks_per_step: ``k``, inner runs in flight (each meta-step averages their
            hypergradients; split across ranks).
        meta_objective: a registered meta-objective name.
        objective_options: its keyword options (defaults in the objective function).
        engine: a registered hypergradient engine name.
        engine_options: its keyword options.
        meta_optimizer: ``"adam"`` (default), ``"sgd"`` or ``"rmsprop"``.
        meta_lr: meta learning rate (> 0).
        batch_size: inner batch size (``None``: the task's default).
        seed: seeds every task draw, initialisation and perturbation.
        meta_steps: the run length the recipe was measured with (the default of
            :meth:`MetaMD.meta_train` and of ``python -m meta_train``).
    """

    preset: str = "kron-adamw"
    preconditioner: str = "lowrank"
    preconditioner_options: dict[str, Any] = field(default_factory=lambda: {"rank": 1})
    rule: str = "adamw"
    rule_options: dict[str, Any] = field(default_factory=dict)
    compose: str = "gradient"
    lr: float = 0.01
    inner_steps: int = 300
    window: int | None = 20
    tasks_per_step: int = 2
    meta_objective: str = "mean-loss"
    objective_options: dict[str, Any] = field(default_factory=dict)
    engine: str = "unroll"
    engine_options: dict[str, Any] = field(default_factory=dict)
    meta_optimizer: str = "adam"
    meta_lr: float = 0.03
    batch_size: int | None = None
    seed: int = 0
    meta_steps: int = 450

    def __post_init__(self) -> None:
        _int("inner_steps", self.inner_steps, 1)
        _int("tasks_per_step", self.tasks_per_step, 1)
        _int("seed", self.seed, 0)
        _int("meta_steps", self.meta_steps, 1)
        if self.window is not None:
            _int("window", self.window, 1)
            if self.window > self.inner_steps:
                raise ValueError(
                    f"window={self.window}: must be at most inner_steps={self.inner_steps}"
                )
        if self.batch_size is not None:
            _int("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        _positive("meta_lr", self.meta_lr)
        for name in (
            "preconditioner_options",
            "rule_options",
            "objective_options",
            "engine_options",
        ):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a table of options")
        if self.preconditioner not in FAMILIES:
            raise ValueError(
                f"preconditioner={self.preconditioner!r}: choose one of {sorted(FAMILIES)}"
            )
        resolve_family(self.preconditioner, self.preconditioner_options)
        get_rule(self.rule).hparams(self.rule_options)
        check_compose(self.compose)
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(
                f"meta_optimizer={self.meta_optimizer!r}: choose one of "
                f"{META_OPTIMIZERS.available()}"
            )
        check_meta_objective(self.meta_objective, self.objective_options)
        check_engine(self.engine, self.engine_options)
        if self.implicit and self.steps_per_window != self.inner_steps:
            raise ValueError(
                f"engine={self.engine!r}: the implicit function theorem differentiates the end "
                f"of a whole inner run; window={self.window} must be None or inner_steps"
            )
        check_types(self)  # what the checks above leave: every field of its annotated type

    @property
    def implicit(self) -> bool:
        return ENGINES.canonical(self.engine)[0] in _IMPLICIT

    @property
    def steps_per_window(self) -> int:
        return self.inner_steps if self.window is None else self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}={value!r}: must be a positive number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")


#: named recipes: ``MetaMD(tasks, preset=name)`` / ``python -m meta_train --preset name``
PRESETS: Registry[dict[str, Any]] = Registry("preset")
PRESETS.register(
    "kron-adamw",
    {},
    description="AdamW on the gradient preconditioned by a learned rank-1 Kronecker "
    "factorisation; the mean training loss over 300-step inner runs in 20-step truncated "
    "unrolls (the default)",
)
PRESETS.register(
    "metamd-paper",
    {
        "preconditioner": "rank1",
        "preconditioner_options": {},
        "rule": "sgd",
        "lr": 0.1,
        "compose": "gradient",
        "inner_steps": 100,
        "window": None,
        "tasks_per_step": 4,
        "meta_objective": "bregman-rate",
        "engine": "neumann",
        "engine_options": {"iterations": 20, "alpha": 0.5},
        "meta_lr": 0.01,
    },
    description="MetaMD as published (Gao et al.): A = I + aa^T, B = I + bb^T, mirror "
    "descent (SGD), Eq. 8 objective, Neumann implicit hypergradient (Algorithm 2)",
)
PRESETS.register(
    "metasgd",
    {
        "preconditioner": "diag",
        "preconditioner_options": {},
        "rule": "sgd",
        "compose": "gradient",
        "lr": 0.1,
    },  # fmt: skip
    description="Meta-SGD (Li et al. 2017): learned per-parameter learning rates on SGD",
)
PRESETS.register(
    "metacurvature",
    {
        "preconditioner": "ekfac-shaped",
        "preconditioner_options": {},
        "rule": "sgd",
        "compose": "gradient",
        "lr": 0.1,
    },  # fmt: skip
    description="Meta-Curvature (Park & Oliva 2019): an inverse-free Kronecker transform "
    "of the gradient on SGD",
)


def preset_config(preset: str = "kron-adamw", **overrides: Any) -> MetaMDConfig:
    """The :class:`MetaMDConfig` of ``preset`` with ``overrides`` applied."""
    fields = {f.name for f in dataclasses.fields(MetaMDConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"options: {unknown} are not MetaMD options; allowed: {sorted(fields)}")
    values = {**PRESETS[preset], **overrides, "preset": PRESETS.get(preset).target}
    if "engine" in overrides and "engine_options" not in overrides:
        values["engine_options"] = {}  # the preset's engine options belong to its engine
    # the default preset's window and run length are the dataclass defaults, not table entries
    window = values.get("window", MetaMDConfig.window)
    steps = values.get("inner_steps", MetaMDConfig.inner_steps)
    if (
        "window" not in overrides
        and isinstance(window, int)
        and isinstance(steps, int)
        and window > steps
    ):
        values["window"] = None  # shorter runs than the preset's window: one window each
    return MetaMDConfig(**values)
