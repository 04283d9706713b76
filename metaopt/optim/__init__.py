"""Optimizers: update rules, the deployable ``Preconditioned`` / ``LearnedOptimizer``, the
baselines and their registry."""

from metaopt.optim.hypergradient_descent import SGDHD, AdamHD
from metaopt.optim.kfac import EKFAC, KFAC
from metaopt.optim.l4 import L4
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.preconditioned import Preconditioned
from metaopt.optim.registry import available_optimizers, get_optimizer, register_optimizer
from metaopt.optim.rules import RULES, UpdateRule, get_rule
from metaopt.optim.shampoo import Shampoo
from metaopt.optim.sign import AddSign, PowerSign, sign_decay

__all__ = [
    "SGDHD",
    "AddSign",
    "AdamHD",
    "EKFAC",
    "KFAC",
    "L4",
    "LearnedOptimizer",
    "PowerSign",
    "Preconditioned",
    "RULES",
    "Shampoo",
    "UpdateRule",
    "available_optimizers",
    "get_optimizer",
    "get_rule",
    "register_optimizer",
    "sign_decay",
]
