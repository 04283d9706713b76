"""Meta-learners, all :class:`MetaLearner`\\ s: APO (online, one training run); MetaMD and its
competitors MetaSGD and MetaCurvature (offline, across tasks)."""

from metaopt.learners.apo import APO, APOConfig
from metaopt.learners.base import META_OPTIMIZERS, MetaLearner, MetaStep, make_meta_optimizer
from metaopt.learners.competitors import MetaCurvature, MetaSGD
from metaopt.learners.metamd import PRESETS, MetaMD, MetaMDConfig, preset_config

__all__ = [
    "APO",
    "META_OPTIMIZERS",
    "PRESETS",
    "APOConfig",
    "MetaCurvature",
    "MetaLearner",
    "MetaMD",
    "MetaMDConfig",
    "MetaSGD",
    "MetaStep",
    "make_meta_optimizer",
    "preset_config",
]
