"""Meta-learners: APO (online, one training run)."""

from metaopt.learners.apo import APO, APOConfig

__all__ = ["APO", "APOConfig"]
