"""Optimizers: the deployable ``Preconditioned`` optimizer and the baselines."""

from metaopt.optim.preconditioned import Preconditioned

__all__ = ["Preconditioned"]
