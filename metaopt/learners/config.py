"""Configuration of the offline meta-learners (MetaMD, MetaSGD, Meta-Curvature).

One dataclass, validated in ``__post_init__``: a bad value fails at construction with a
message naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metaopt.kron.families import family_options, resolve_family

__all__ = ["IMPLICIT_ENGINES", "UNROLLED_ENGINES", "OuterConfig"]

#: engines that differentiate the rephrased inner objective B_M(theta, theta_1) at theta_T
IMPLICIT_ENGINES = ("neumann", "closed_form", "cg", "exact")
#: engines that differentiate through the inner steps themselves
UNROLLED_ENGINES = ("unroll", "forward")
META_OPTIMIZERS = ("adam", "sgd")


@dataclass
class OuterConfig:
    """Outer-loop settings (MetaMD Algorithm 1; names in brackets are the paper's).

    Attributes:
        family: a registered preconditioner family: ``"rank1"`` (the paper's
            ``A = aa^T + I``), ``"lowrank"`` (rank ``rank``), ``"diag"`` (MetaSGD),
            ``"scalar"``, ``"ekfac"`` (Meta-Curvature's inverse-free Kronecker transform;
            it has no metric, so unrolled engines only).
        inner_steps: ``T``, inner mirror-descent steps per task (>= 1, default 100).
        tasks_per_step: ``k``, tasks per outer step (>= 1, default 4).
        inner_lr: ``eta``, the inner step size (> 0, default 0.1).
        inner_momentum: heavy-ball coefficient of the inner steps (default 0, the paper's
            plain mirror descent).
        gamma: ``gamma``, weight of ``||M - I||_F`` in ``"bregman-rate"`` (default 0).
        k_lambda: ``k``, weight of ``1/lambda`` in ``"bregman-rate"`` (default 0).
        engine: hypergradient engine: implicit ``"neumann"`` (paper default),
            ``"closed_form"``, ``"cg"``, ``"exact"``, or unrolled ``"unroll"`` /
            ``"forward"``.
        engine_options: passed to the engine, e.g. ``{"iterations": 20, "alpha": 0.5}``
            for Neumann, ``{"truncate": 20}`` for ``"unroll"``.
        meta_lr: meta learning rate (> 0, default 1e-2).
        meta_optimizer: ``"adam"`` (default) or ``"sgd"``.
        rank: the family's ``rank`` (``"lowrank"``; ignored by families without one).
        learn_scale: learn a per-layer scale ``c`` (families with that option only).
        init_scale: initial size of the factors (family-specific, default 1e-3).
        meta_objective: registered meta-objective name (default ``"bregman-rate"``).
        meta_objective_options: extra keyword options for the meta-objective.
        batch_size: inner batch size (``None``: the task's default).
        seed: seeds every task draw and initialisation (outer step ``s`` uses ``(seed, s)``).
    """

    family: str = "rank1"
    inner_steps: int = 100
    tasks_per_step: int = 4
    inner_lr: float = 0.1
    inner_momentum: float = 0.0
    gamma: float = 0.0
    k_lambda: float = 0.0
    engine: str = "neumann"
    engine_options: dict[str, Any] = field(default_factory=dict)
    meta_lr: float = 1e-2
    meta_optimizer: str = "adam"
    rank: int = 1
    learn_scale: bool = False
    init_scale: float = 1e-3
    meta_objective: str = "bregman-rate"
    meta_objective_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _int("inner_steps", self.inner_steps, 1, "T must be at least 1")
        _int("tasks_per_step", self.tasks_per_step, 1, "k must be at least 1")
        _int("rank", self.rank, 1, "a positive integer")
        _int("seed", self.seed, 0, "a non-negative integer")
        if self.batch_size is not None:
            _int("batch_size", self.batch_size, 1, "a positive integer or None")
        _positive("inner_lr", self.inner_lr)
        _positive("meta_lr", self.meta_lr)
        if not 0.0 <= self.inner_momentum < 1.0:
            raise ValueError(f"inner_momentum={self.inner_momentum!r}: must be in [0, 1)")
        for name in ("gamma", "k_lambda"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name}={value!r}: must be a non-negative number")
        _choice("engine", self.engine, IMPLICIT_ENGINES + UNROLLED_ENGINES)
        _choice("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        family_cls, _ = resolve_family(self.family, self.family_options())
        if not family_cls.has_metric and self.engine in IMPLICIT_ENGINES:
            raise ValueError(
                f"engine={self.engine!r}: the {self.family!r} family has no metric M = P^-1, "
                f"so the implicit rephrased objective B_M does not exist; use 'unroll' or "
                f"'forward'"
            )
        if not isinstance(self.engine_options, dict):
            raise ValueError(f"engine_options={self.engine_options!r}: must be a dict")
        truncate = self.engine_options.get("truncate")
        if truncate is not None and (not isinstance(truncate, int) or truncate < 1):
            raise ValueError(f"engine_options['truncate']={truncate!r}: must be an int >= 1")
        if not isinstance(self.meta_objective, str) or not self.meta_objective:
            raise ValueError(f"meta_objective={self.meta_objective!r}: must be a registered name")

    @property
    def implicit(self) -> bool:
        return self.engine in IMPLICIT_ENGINES

    def objective_options(self) -> dict[str, Any]:
        """Keyword options for the meta-objective (``gamma``/``k_lambda`` for bregman-rate)."""
        opts: dict[str, Any] = {}
        if self.meta_objective == "bregman-rate":
            opts = {"k_lambda": self.k_lambda, "gamma": self.gamma}
        return {**opts, **self.meta_objective_options}

    def family_options(self) -> dict[str, Any]:
        """Keyword options for ``KroneckerPreconditioner.for_model``: ``init_scale`` and
        ``rank`` where the family takes them, ``learn_scale`` when set (refused by a family
        without it)."""
        takes = family_options(self.family)
        opts: dict[str, Any] = {k: getattr(self, k) for k in ("init_scale", "rank") if k in takes}
        if self.learn_scale:
            opts["learn_scale"] = True
        return opts


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {list(allowed)}")


def _int(name: str, value: object, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low} ({what})")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}={value!r}: must be a positive number")
