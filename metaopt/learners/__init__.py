"""Meta-learners: APO (online, one training run); MetaMD and its competitors (offline,
multi-task)."""

from metaopt.learners.apo import APO, APOConfig
from metaopt.learners.config import OuterConfig
from metaopt.learners.meta_competitors import OFFLINE_LEARNERS, MetaCurvature, MetaSGD
from metaopt.learners.metamd import MetaMD, MetaMDConfig
from metaopt.learners.outer import OuterLearner

__all__ = ["APO", "APOConfig"]
__all__ += [
    "OFFLINE_LEARNERS",
    "MetaCurvature",
    "MetaMD",
    "MetaMDConfig",
    "MetaSGD",
    "OuterConfig",
    "OuterLearner",
]
