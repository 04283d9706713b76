"""meta_test: the evaluation harness (specs, runs, fair tuning, metrics, reports, plots).

``meta_test.run_comparison(task, specs, steps=..., seeds=..., hpo=...)`` returns the
``results.json`` dict; ``python -m meta_test`` is the command line. A spec may fix
hyperparameters, ``"sgdm?momentum=0.5"`` (:mod:`meta_test.specs`); what the search selects
on, over how many seeds and steps, and how ties break is :mod:`meta_test.selection`
(``select_on``, ``search_seeds``, ``search_aggregate``, ``search_steps``).
"""

from meta_test.comparison import run_comparison
from meta_test.space import Dim, SearchSpace
from meta_test.specs import (
    OptimizerTrainer,
    Trainer,
    available_specs,
    build_trainer,
    register_spec,
    search_space,
)

__all__ = [
    "Dim",
    "OptimizerTrainer",
    "SearchSpace",
    "Trainer",
    "available_specs",
    "build_trainer",
    "register_spec",
    "run_comparison",
    "search_space",
]
