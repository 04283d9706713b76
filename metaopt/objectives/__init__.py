"""Meta-objectives registered by name (``proximal`` for APO, ``bregman-rate`` for MetaMD)."""

from metaopt.objectives import proximal  # noqa: F401  (registers "proximal")
from metaopt.objectives.base import (
    MetaContext,
    available_meta_objectives,
    evaluate_meta_objective,
    get_meta_objective,
    register_meta_objective,
)

__all__ = [
    "MetaContext",
    "available_meta_objectives",
    "evaluate_meta_objective",
    "get_meta_objective",
    "register_meta_objective",
]

# registers "bregman-rate", "final-loss", "log-final-loss", and the trajectory objectives
from metaopt.objectives import bregman_rate as _bregman_rate  # noqa: E402,F401
from metaopt.objectives import trajectory as _trajectory  # noqa: E402,F401
