"""APO's configuration: one dataclass, validated at construction (``__post_init__``): every
field against its range and its annotated type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from metaopt.cli_support import check_types
from metaopt.learners.apo.adapts import ADAPTS
from metaopt.learners.base import META_OPTIMIZERS
from metaopt.objectives.base import check_meta_objective
from metaopt.objectives.proximal import FSD_DIVERGENCES

__all__ = ["APOConfig"]


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}={value!r}: must be a positive number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name}={value!r}: must be a non-negative number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")


@dataclass
class APOConfig:
    """Everything that parameterises :class:`metaopt.APO` (Bae et al. 2022, Algorithm 1).

    Attributes:
        base: base optimizer ``"sgd" | "sgdm" | "rmsprop" | "adam"`` (``"kfac"`` for
            ``adapt="kfac-damping"``; for ``adapt="precond"`` the warm-up optimizer,
            ``"sgdm"`` or ``"adam"``). ``None``: ``"rmsprop"`` / ``"kfac"`` / ``"sgdm"``
            for the adapts that need one, else ``"sgdm"``.
        adapt: ``"lr"`` (global lr, stored as its log), ``"layer-lr"`` (one lr per layer,
            the ``"scalar"`` family), ``"rmsprop-eps-rho"`` (lr, eps and the power rho of
            RMSprop, Bae et al. 2022, earlier version, Eq. 21), ``"kfac-damping"`` (lr and
            damping of K-FAC),
            ``"precond"`` (APO-Precond, the ``"ekfac-shaped"`` family of Eq. 9-10).
        lr: initial learning rate (fixed ``eta`` for ``"precond"``). Default 0.1.
        momentum: heavy-ball momentum of ``sgdm``, of the K-FAC step and of the sgdm
            warm-up (default 0.9); applied on top of the adapted step (Bae et al. 2022, earlier
            version, Eq. 18-19).
        nesterov: Nesterov momentum for ``sgdm``.
        weight_decay: L2 added to the gradient.
        betas, eps, eps_root: Adam / RMSprop constants (``eps`` is also RMSprop's initial
            eps for ``"rmsprop-eps-rho"``). ``eps_root=None``: ``1e-30`` for
            ``"rmsprop-eps-rho"``, else 0; the derivative in rho is finite at ``v = 0``
            without it, the derivative in ``v`` there only with ``eps_root > 0``.
        alpha: RMSprop's decay of the squared-gradient average (default 0.99).
        power: RMSprop's initial power rho (default 0.5).
        damping: K-FAC's initial damping (default 1e-3).
        kfac_options: extra :class:`~metaopt.optim.kfac.KFAC` options for
            ``"kfac-damping"`` (``factor_update_freq``, ``inv_update_freq``, ...).
        lambda_fsd: weight of the output-space term (default 0.1).
        lambda_wsd: weight of the weight-space term; ``None``: 0 for learning-rate
            adaptation, 1.0 for ``"precond"``.
        fsd: output divergence ``"kl" | "mse" | "bregman"`` (default ``"kl"``).
        meta_interval: K, one meta-update every K steps (default 10).
        meta_objective: registered meta-objective name (default ``"proximal"``).
        objective_options: extra keyword options for the meta-objective.
        meta_optimizer: ``"rmsprop" | "adam" | "sgd"``; ``None``: RMSprop for learning-rate
            adaptation, Adam for ``"precond"`` (Bae et al. 2022, appendix C.2).
        meta_lr: ``None``: 0.1 (learning-rate adaptation), 0.01 (``"rmsprop-eps-rho"``,
            Bae et al. 2022, appendix D.7) or 1e-4 (``"precond"``).
        fresh_loss_batch: evaluate the loss term on the fresh batch B' instead of B (the
            short-horizon-bias ablation of Bae et al. 2022, appendix E, Eq. 14).
        warmup: ``"precond"`` only: steps during which theta follows ``base`` while P is
            meta-learned (default 3000).
        warmup_lr: learning rate of the warm-up optimizer (``None``: ``lr``).
        precond_scale: the fixed 0.9 that scales the preconditioned step (Bae et al. 2022,
            appendix C.2).
        precond_momentum: momentum of the preconditioned step (default 0).
        precond_options: options of ``KroneckerPreconditioner.for_model(model, "ekfac-shaped")``,
            e.g. ``{"dense_diag_max": 16}`` for full blocks on small lone parameters
            (``skip`` for identity on some parameters).
        check_every_step: sync every step to check the loss is finite (default: check at
            each meta step, naming the first non-finite step).
        fixed_lr: ``"rmsprop-eps-rho"`` only: keep ``lr`` fixed and adapt only eps and rho
            (Bae et al. 2022, appendix D.7's protocol; default ``False``: lr, eps and rho as in
            the earlier version).
        joint_forward: run the lookahead's loss batch and FSD batch through theta' as one
            concatenated batch (default ``True``; used only when no batch-norm or dropout
            module is in training mode). Set ``False`` for a model with other modules that
            couple the rows of a batch.
    """

    base: str | None = None
    adapt: str = "lr"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float | None = None
    alpha: float = 0.99
    power: float = 0.5
    damping: float = 1e-3
    kfac_options: dict[str, Any] = field(default_factory=dict)
    lambda_fsd: float = 0.1
    lambda_wsd: float | None = None
    fsd: str = "kl"
    meta_interval: int = 10
    meta_objective: str = "proximal"
    objective_options: dict[str, Any] = field(default_factory=dict)
    meta_optimizer: str | None = None
    meta_lr: float | None = None
    fresh_loss_batch: bool = False
    warmup: int = 3000
    warmup_lr: float | None = None
    precond_scale: float = 0.9
    precond_momentum: float = 0.0
    precond_options: dict[str, Any] = field(default_factory=dict)
    check_every_step: bool = False
    fixed_lr: bool = False
    joint_forward: bool = True

    def __post_init__(self) -> None:
        if self.adapt not in ADAPTS:
            raise ValueError(f"adapt={self.adapt!r}: choose one of {ADAPTS.available()}")
        entry = ADAPTS.get(self.adapt)
        allowed = tuple(entry.meta["bases"])
        if self.base is None:
            self.base = allowed[0] if len(allowed) == 1 else "sgdm"
        if self.base not in allowed:
            raise ValueError(f"base={self.base!r}: adapt={self.adapt!r} allows {list(allowed)}")
        _positive("lr", self.lr)
        for name in ("momentum", "precond_momentum", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r}: must be in [0, 1)")
        if self.nesterov and self.momentum <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={self.momentum!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r}: must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _non_negative("weight_decay", self.weight_decay)
        _positive("eps", self.eps)
        if self.eps_root is None:
            self.eps_root = 1e-30 if self.adapt == "rmsprop-eps-rho" else 0.0
        _non_negative("eps_root", self.eps_root)
        if not isinstance(self.power, int | float) or not 0.0 < self.power < 1.0:
            raise ValueError(f"power={self.power!r}: must be in (0, 1)")
        _positive("damping", self.damping)
        _non_negative("lambda_fsd", self.lambda_fsd)
        if self.lambda_wsd is None:
            self.lambda_wsd = 1.0 if self.adapt == "precond" else 0.0
        _non_negative("lambda_wsd", self.lambda_wsd)
        if self.fsd not in FSD_DIVERGENCES:
            raise ValueError(f"fsd={self.fsd!r}: choose one of {FSD_DIVERGENCES.available()}")
        if not isinstance(self.meta_interval, int) or self.meta_interval < 1:
            raise ValueError(f"meta_interval={self.meta_interval!r}: must be an integer >= 1")
        if not isinstance(self.meta_objective, str) or not self.meta_objective:
            raise ValueError(f"meta_objective={self.meta_objective!r}: must be a registered name")
        if not isinstance(self.kfac_options, dict):
            raise ValueError(f"kfac_options={self.kfac_options!r}: must be a dict")
        fixed = {"lr", "momentum", "kl_clip", "damping"} & set(self.kfac_options)
        if fixed:
            raise ValueError(f"kfac_options: {sorted(fixed)} are set by APO, not K-FAC options")
        if not isinstance(self.precond_options, dict):
            raise ValueError(f"precond_options={self.precond_options!r}: must be a dict")
        if not isinstance(self.objective_options, dict):
            raise ValueError(f"objective_options={self.objective_options!r}: must be a dict")
        # the proximal objective's weights are this config's own fields (APO's hyperparameters)
        given = dict(self.objective_options)
        if self.meta_objective == "proximal":
            given = {"lambda_fsd": 0.0, "lambda_wsd": 0.0, "fsd": "kl", **given}
        check_meta_objective(self.meta_objective, given)
        lr_adapt = entry.meta.get("lr_adapt", False)
        if self.meta_optimizer is None:
            self.meta_optimizer = "rmsprop" if lr_adapt else "adam"
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(
                f"meta_optimizer={self.meta_optimizer!r}: choose one of "
                f"{META_OPTIMIZERS.available()}"
            )
        if self.meta_lr is None:  # Bae et al. 2022, appendix C.2; D.7 for eps/rho
            self.meta_lr = 0.01 if self.adapt == "rmsprop-eps-rho" else 0.1 if lr_adapt else 1e-4
        _positive("meta_lr", self.meta_lr)
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r}: must be a non-negative integer")
        if self.warmup_lr is None:
            self.warmup_lr = self.lr
        _positive("warmup_lr", self.warmup_lr)
        _positive("precond_scale", self.precond_scale)
        if not isinstance(self.joint_forward, bool):
            raise ValueError(f"joint_forward={self.joint_forward!r}: must be True or False")
        if not isinstance(self.fixed_lr, bool):
            raise ValueError(f"fixed_lr={self.fixed_lr!r}: must be True or False")
        if self.fixed_lr and self.adapt != "rmsprop-eps-rho":
            raise ValueError(f"fixed_lr=True: only for adapt='rmsprop-eps-rho', not {self.adapt!r}")
        check_types(self)  # what the checks above leave: every field of its annotated type
