"""Random teacher-network regression: a task family of a different kind from image
classification, for meta-training and meta-testing learned optimizers.

Each task is a student MLP regressing the output of a random teacher MLP on anisotropic
Gaussian inputs (the teacher-student setting of Gardner & Derrida 1989 and Saad & Solla
1995, with the ill-conditioned inputs under which preconditioning pays off). A task id
fixes everything random in the task: the teacher's weights, the input covariance's
eigenvalues (log-uniform over ``[1 / condition, 1]``) and eigenbasis, and the data.

* family ``"teacher-regression"``: ``sample(generator)`` draws a task id below
  ``HELD_OUT_FROM`` (the meta-training distribution);
* task ``"teacher-regression:<id>"``: one task by id; ids from ``HELD_OUT_FROM`` on are never
  drawn by the family, so ``teacher-regression:1000000``, ``...:1000001``, ... are unseen
  tasks of the same distribution for meta-testing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tasks.base import Task, TaskFamily
from tasks.registry import register_family, register_task
from tasks.synthetic import random_orthogonal, regression_task

__all__ = ["HELD_OUT_FROM", "TeacherRegression", "teacher_regression_task"]

#: task ids the family samples are below this; ids from here on are held out
HELD_OUT_FROM = 1_000_000


def _student(dim: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    size = dim
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    layers.append(nn.Linear(size, 1))
    return nn.Sequential(*layers)


class TeacherRegression(TaskFamily):
    """Students learn random tanh teachers on anisotropic inputs (see the module docstring).

    Args:
        dim: input dimension (default 32).
        teacher_width: hidden width of the one-hidden-layer tanh teacher (default 16).
        student_width: hidden width of the tanh student MLP (default 64).
        student_depth: its number of hidden layers (default 2).
        condition: ratio of the largest to the smallest input variance (default 100).
        noise_std: target noise (default 0.05).
        n_train: training examples (default 1024).
        n_val: validation examples (default 256).
        n_test: test examples (default 256).
        batch_size: training batch size (default 64).
    """

    name = "teacher-regression"

    def __init__(
        self,
        dim: int = 32,
        teacher_width: int = 16,
        student_width: int = 64,
        student_depth: int = 2,
        condition: float = 100.0,
        noise_std: float = 0.05,
        n_train: int = 1024,
        n_val: int = 256,
        n_test: int = 256,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        for key, v in (("dim", dim), ("teacher_width", teacher_width),
                       ("student_width", student_width), ("student_depth", student_depth),
                       ("n_train", n_train), ("n_val", n_val), ("n_test", n_test),
                       ("batch_size", batch_size)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}={v!r}: must be a positive integer")
        if isinstance(condition, bool) or not isinstance(condition, int | float) or condition < 1:
            raise ValueError(f"condition={condition!r}: must be a number >= 1")
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"noise_std={noise_std!r}: must be a non-negative number")
        self.dim, self.teacher_width = dim, teacher_width
        self.student = (student_width, student_depth)
        self.condition, self.noise_std = float(condition), float(noise_std)
        self.sizes = (n_train, n_val, n_test)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype

    def sample(self, generator: torch.Generator) -> Task:
        """A task of the meta-training distribution (id below ``HELD_OUT_FROM``)."""
        return self.task(int(torch.randint(HELD_OUT_FROM, (1,), generator=generator)))

    def task(self, task_id: int) -> Task:
        """The task with id ``task_id`` (everything random in it is seeded by the id)."""
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
            raise ValueError(f"task_id={task_id!r}: must be a non-negative integer")
        gen = torch.Generator().manual_seed(task_id)
        d, h = self.dim, self.teacher_width
        log_var = torch.rand(d, generator=gen, dtype=torch.float64) * -math.log(self.condition)
        basis = random_orthogonal(d, gen)
        w1 = torch.randn(d, h, generator=gen, dtype=torch.float64) / math.sqrt(d)
        w2 = torch.randn(h, 1, generator=gen, dtype=torch.float64) / math.sqrt(h)
        n = sum(self.sizes)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
        x = (z * (0.5 * log_var).exp()) @ basis.T
        # the teacher sees whitened inputs, so every input direction matters to the target
        white = (x @ basis) * (-0.5 * log_var).exp()
        y = torch.tanh(white @ w1) @ w2 + self.noise_std * torch.randn(
            n, 1, generator=gen, dtype=torch.float64
        )
        width, depth = self.student
        info = {"task_id": task_id, "input_variances": log_var.exp(),
                "held_out": task_id >= HELD_OUT_FROM}  # fmt: skip
        return regression_task(f"teacher-regression:{task_id}", lambda: _student(d, width, depth),
                               x, y, self.sizes, batch_size=self.batch_size, device=self.device,
                               dtype=self.dtype, info=info)  # fmt: skip


def teacher_regression_task(name: str, **options: Any) -> Task:
    """``teacher-regression:<id>``: one task of :class:`TeacherRegression` by id."""
    try:
        task_id = int(name)
    except ValueError:
        raise ValueError(f"task 'teacher-regression:{name}': the id must be an integer") from None
    return TeacherRegression(**options).task(task_id)


register_family("teacher-regression")(TeacherRegression)
register_task("teacher-regression:<name>")(teacher_regression_task)
