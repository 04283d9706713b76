"""APO (Amortized Proximal Optimization, Bae, Vicol, HaoChen & Grosse 2022): an online
meta-learner that adapts learning rates, RMSprop / K-FAC constants or a full EKFAC-shaped
preconditioner during one training run (:class:`APO`, :class:`APOConfig`).

What it can adapt is the :data:`ADAPTS` registry (``lr``, ``layer-lr``,
``rmsprop-eps-rho``, ``kfac-damping``, ``precond``); each adapt is a
:class:`~metaopt.learners.apo.adapts.Rule` over the shared update kernels.
:func:`greedy_lr` (:mod:`~metaopt.learners.apo.diagnostics`) probes APO's short-horizon
bias: the learning rate its one-step lookahead prefers.
"""

from metaopt.learners.apo import kfac as _kfac  # noqa: F401  (registers "kfac-damping")
from metaopt.learners.apo import rules as _rules  # noqa: F401  (registers the other adapts)
from metaopt.learners.apo.adapts import ADAPTS, Rule
from metaopt.learners.apo.config import APOConfig
from metaopt.learners.apo.diagnostics import GREEDY_LRS, GreedyStep, greedy_lr
from metaopt.learners.apo.learner import APO

__all__ = ["ADAPTS", "APO", "APOConfig", "GREEDY_LRS", "GreedyStep", "Rule", "greedy_lr"]
