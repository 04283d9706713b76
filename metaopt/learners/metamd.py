"""MetaMD (Meta Mirror Descent, Gao et al.): learn a Bregman divergence across tasks.

``phi_M(theta) = 1/2 theta^T M theta`` with ``M`` block-diagonal per layer and each block
``c (A kron B)``, ``A = I + U U^T``, ``B = I + V V^T`` (rank 1 = the paper's ``aa^T + I``;
higher ranks and the learned scale ``c`` are metaopt's). The mirror step
``theta <- theta - eta M^{-1} grad`` is :class:`metaopt.optim.Preconditioned` with the
learned preconditioner; meta-training minimises ``"bregman-rate"`` (Eq. 8) with implicit
hypergradients of the rephrased inner objective ``B_M(theta, theta_1)`` at ``theta_T``
(Eq. 13, Algorithm 2)::

    learner = metaopt.MetaMD(family_of_tasks, inner_steps=200, tasks_per_step=4)
    pre = learner.meta_train(outer_steps=50)
    metaopt.save_preconditioner(pre, "metamd.safetensors")
    # deploy on a new model of the same architecture
    pre = metaopt.load_preconditioner("metamd.safetensors", new_model)
    opt = metaopt.optim.Preconditioned(new_model.named_parameters(), pre, lr=0.1)
"""

from __future__ import annotations

from typing import Any

from metaopt.learners.config import OuterConfig
from metaopt.learners.outer import OuterLearner

__all__ = ["MetaMD", "MetaMDConfig"]


def MetaMDConfig(**fields: Any) -> OuterConfig:  # noqa: N802 - a config factory
    """An :class:`OuterConfig` with MetaMD's defaults (rank-1 family, Neumann J=20)."""
    return OuterConfig(**{**MetaMD.defaults, **fields})


class MetaMD(OuterLearner):
    """MetaMD: ``family="rank1"``, ``engine="neumann"`` (``iterations=20``, ``alpha=0.5``),
    ``meta_objective="bregman-rate"``, Adam meta-optimizer. See :class:`OuterLearner` for the
    arguments and :class:`~metaopt.learners.config.OuterConfig` for every field."""

    defaults: dict[str, Any] = {
        "family": "rank1",
        "engine": "neumann",
        "engine_options": {"iterations": 20, "alpha": 0.5},
        "meta_objective": "bregman-rate",
    }
