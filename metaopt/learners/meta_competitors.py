"""The meta-learned competitors of MetaMD, on the same outer loop and tasks.

* :class:`MetaSGD` (Li et al., 2017): learned per-parameter learning rates, the ``"diag"``
  family (direction ``exp(s) * g``).
* :class:`MetaCurvature` (Park & Oliva, 2019): a Kronecker-factored transform of the
  gradient applied without any inverse, the ``"ekfac"`` family
  (direction ``B (S^2 * (B^T G A)) A^T``, identity at the start).

Both are trained with truncated reverse-mode unrolled hypergradients (``engine="unroll"``,
``truncate=20`` by default) of the task's training loss after the inner run
(``meta_objective="final-loss"``); neither has the metric ``M = P^{-1}`` the implicit MetaMD
objective needs. Their artefacts deploy exactly like MetaMD's (``Preconditioned``).
"""

from __future__ import annotations

from typing import Any

from metaopt.learners.metamd import MetaMD
from metaopt.learners.outer import OuterLearner

__all__ = ["OFFLINE_LEARNERS", "MetaCurvature", "MetaSGD"]

_UNROLLED = {
    "engine": "unroll",
    "engine_options": {"truncate": 20},
    "meta_objective": "final-loss",
    "init_scale": 0.0,
}


class MetaSGD(OuterLearner):
    """Per-parameter learning rates (``family="diag"``), truncated unrolled hypergradients."""

    defaults: dict[str, Any] = {"family": "diag", **_UNROLLED}


class MetaCurvature(OuterLearner):
    """Inverse-free Kronecker transform (``family="ekfac"``), truncated unrolled hypergradients."""

    defaults: dict[str, Any] = {"family": "ekfac", **_UNROLLED}


#: the offline learners by name (for configs and CLIs): all share the OuterLearner protocol
OFFLINE_LEARNERS: dict[str, type[OuterLearner]] = {
    "metamd": MetaMD,
    "metasgd": MetaSGD,
    "metacurvature": MetaCurvature,
}
