"""Task distributions, datasets and models for meta-training and meta-testing."""

import tasks.reconstruction  # noqa: F401  (registers "autoencoder:<name>")
import tasks.rotated  # noqa: F401  (registers "rotated-mnist")
import tasks.synthetic  # noqa: F401  (registers rosenbrock, regression and quadratic families)
import tasks.tabular  # noqa: F401  (registers digits, rotated-digits and sklearn tabular tasks)
import tasks.teacher  # noqa: F401  (registers the teacher-regression family and its tasks)
import tasks.uci  # noqa: F401  (registers "uci:<name>")
import tasks.vision  # noqa: F401  (registers the torchvision-backed tasks and suites)
from tasks.base import BatchStream, Task, TaskFamily, TaskSuite
from tasks.registry import (
    available,
    get_family,
    get_suite,
    get_task,
    register_family,
    register_suite,
    register_task,
)

__all__ = [
    "BatchStream",
    "Task",
    "TaskFamily",
    "TaskSuite",
    "available",
    "get_family",
    "get_suite",
    "get_task",
    "register_family",
    "register_suite",
    "register_task",
]
