"""MetaMD's meta-learned competitors, on the same learner, tasks, objective and engine.

* :class:`MetaSGD` (Li, Zhou, Chen & Li 2017, "Meta-SGD"): learned per-parameter learning
  rates, the ``"diag"`` family on plain SGD (direction ``exp(s) * g``).
* :class:`MetaCurvature` (Park & Oliva 2019, "Meta-Curvature"): a Kronecker-factored
  transform of the gradient applied without any inverse, the ``"ekfac-shaped"`` family on SGD
  (direction ``B (S^2 * (B^T G A)) A^T``, the identity at the start).

Both are :class:`~metaopt.learners.metamd.MetaMD` with their preset as the default
(``MetaMD(tasks, preset="metasgd")`` is the same learner); their files deploy exactly like
MetaMD's.
"""

from __future__ import annotations

from metaopt.learners.metamd.learner import MetaMD

__all__ = ["MetaCurvature", "MetaSGD"]


class MetaSGD(MetaMD):
    """Per-parameter learning rates (preset ``"metasgd"``)."""

    default_preset = "metasgd"


class MetaCurvature(MetaMD):
    """Inverse-free Kronecker transform of the gradient (preset ``"metacurvature"``)."""

    default_preset = "metacurvature"
