"""Meta-learners: MetaMD and its competitors (offline, multi-task), APO (online)."""

from metaopt.learners.apo import APO, APOConfig
from metaopt.learners.config import OuterConfig
from metaopt.learners.meta_competitors import MetaCurvature, MetaSGD
from metaopt.learners.metamd import MetaMD, MetaMDConfig
from metaopt.learners.outer import OuterLearner

__all__ = [
    "APO",
    "APOConfig",
    "MetaCurvature",
    "MetaMD",
    "MetaMDConfig",
    "MetaSGD",
    "OuterConfig",
    "OuterLearner",
]
