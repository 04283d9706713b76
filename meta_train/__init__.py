"""meta_train: the meta-training pipeline (CLI, outer loop, checkpoints, torch.distributed).

Run ``python -m meta_train --help``; programmatic pieces::

    from meta_train import TrainConfig, register_learner, run, save_checkpoint, load_checkpoint
"""

from meta_train.checkpoint import (
    CheckpointError,
    NonFiniteState,
    load_checkpoint,
    save_checkpoint,
)
from meta_train.config import TrainConfig
from meta_train.distributed import CollectiveFailed, Dist, setup
from meta_train.learners import available_learners, register_learner
from meta_train.runner import Stopped, run

__all__ = [
    "CheckpointError",
    "CollectiveFailed",
    "Dist",
    "NonFiniteState",
    "Stopped",
    "TrainConfig",
    "available_learners",
    "load_checkpoint",
    "register_learner",
    "run",
    "save_checkpoint",
    "setup",
]
