"""Task abstractions: ``Task``, ``TaskFamily``, ``TaskSuite`` and the seeded batch stream.

Every task is trained by the same loop::

    model = task.make_model(seed)
    stream = task.train_batches(seed)
    for step in range(n):
        x, y = next(stream)
        loss = task.loss(model(x), y)

and judged with ``task.evaluate(model, split)``, which returns ``{"loss": ..., metric: ...}``
with ``metric`` ``"accuracy"`` or ``"mse"``.
"""

from __future__ import annotations

import abc
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["BatchStream", "Metric", "Task", "TaskFamily", "TaskSuite", "Split"]

Metric = Literal["accuracy", "mse"]
Split = Literal["train", "val", "test"]
METRICS = ("accuracy", "mse")


def _to(batch: Any, device: torch.device, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    y = y.to(device, non_blocking=True)
    return x, y


class BatchStream(Iterator[tuple[Tensor, Tensor]]):
    """Infinite, seeded, resumable stream of training batches.

    Each epoch is a fresh permutation drawn from a ``torch.Generator`` seeded with ``seed``.
    ``state_dict()`` holds the epoch, the position inside it and the generator state, so a
    resumed stream yields exactly the batches the uninterrupted one would have.

    Args:
        dataset: a ``TensorDataset`` (indexed directly, fast) or any map-style dataset
            (batched through a ``DataLoader`` over the same permutation).
        batch_size: examples per batch (the last partial batch of an epoch is dropped unless
            the dataset is smaller than one batch).
        seed: shuffling seed.
        device: where batches go.
        dtype: the dtype of floating inputs (``None``: unchanged).
        num_workers: ``DataLoader`` workers for map-style datasets (default 0).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError("dataset: is empty; a task needs at least one training example")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        self.dataset = dataset
        self.batch_size = min(batch_size, n)
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch = 0
        self.position = 0
        self._perm = torch.randperm(n, generator=self.generator)

    def __next__(self) -> tuple[Tensor, Tensor]:
        n = self._perm.numel()
        if self.position + self.batch_size > n:
            self.epoch += 1
            self.position = 0
            self._perm = torch.randperm(n, generator=self.generator)
        idx = self._perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        if isinstance(self.dataset, TensorDataset):
            batch = tuple(t[idx] for t in self.dataset.tensors)
        else:
            loader = DataLoader(
                torch.utils.data.Subset(self.dataset, idx.tolist()),
                batch_size=len(idx),
                shuffle=False,
                num_workers=self.num_workers,
            )
            batch = next(iter(loader))
        return _to(batch, self.device, self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "perm": self._perm.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = state["perm"].clone()
        self.generator.set_state(state["generator"])


@dataclass
class Task:
    """One training problem.

    Attributes:
        name: registry-style name (e.g. ``"digits"``, ``"rotated-digits/45"``).
        model_fn: builds a fresh model (called under a fixed seed by ``make_model``).
        loss_fn: ``(output, target) -> scalar`` mean loss.
        metric: ``"accuracy"`` (classification) or ``"mse"`` (regression / synthetic).
        train, val, test: map-style datasets of ``(input, target)`` pairs.
        batch_size: default training batch size.
        device: where models and batches live (default CPU).
        dtype: floating dtype for models and inputs (``None`` keeps the defaults).
        num_classes: classes for classification tasks, else ``None``.
        info: free-form description (source, split sizes, options).
        prediction_fn: maps the model output to the prediction the ``"mse"`` metric compares
            with the target (``None``: the output itself; e.g. ``torch.sigmoid`` when the
            model returns logits of pixel intensities).
    """

    name: str
    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: Metric
    train: Dataset
    val: Dataset
    test: Dataset
    batch_size: int = 128
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    num_classes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    prediction_fn: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: must be one of {list(METRICS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be a positive integer")
        self.device = torch.device(self.device)

    # --- models --------------------------------------------------------------------------
    def make_model(self, seed: int = 0) -> nn.Module:
        """A fresh model with initial weights determined by ``seed`` alone.

        The global RNG is forked, so calling this does not perturb other random streams.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = self.model_fn()
        model = model.to(self.device)
        if self.dtype is not None:
            model = model.to(self.dtype)
        return model

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(output, target)

    # --- data ----------------------------------------------------------------------------
    def train_batches(self, seed: int = 0, batch_size: int | None = None) -> BatchStream:
        """Infinite seeded stream of training batches on ``device``."""
        return BatchStream(self.train, batch_size or self.batch_size, seed, self.device, self.dtype)

    def batches(
        self, split: Split = "test", batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One ordered pass over ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        data = self._split(split)
        bs = batch_size or max(self.batch_size, 256)
        if isinstance(data, TensorDataset):
            n = len(data)
            for start in range(0, n, bs):
                batch = tuple(t[start : start + bs] for t in data.tensors)
                yield _to(batch, self.device, self.dtype)
        else:
            for batch in DataLoader(data, batch_size=bs, shuffle=False):
                yield _to(batch, self.device, self.dtype)

    def _split(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: must be one of ['train', 'val', 'test']")
        return getattr(self, split)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: Split = "test", batch_size: int | None = None
    ) -> dict[str, float]:
        """``{"loss": mean loss, metric: accuracy in [0, 1] or mean squared error}``."""
        was_training = model.training
        model.eval()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        total_metric = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for x, y in self.batches(split, batch_size):
            out = model(x)
            n = y.shape[0] if y.dim() > 0 else 1
            total_loss += self.loss(out, y).double() * n
            if self.metric == "accuracy":
                total_metric += (out.argmax(dim=-1) == y).double().sum()
            else:
                pred = out if self.prediction_fn is None else self.prediction_fn(out)
                total_metric += (pred.double() - y.double()).pow(2).reshape(n, -1).mean(1).sum()
            count += n
        model.train(was_training)
        if count == 0:
            raise ValueError(f"split={split!r} of task {self.name!r} is empty")
        return {"loss": float(total_loss / count), self.metric: float(total_metric / count)}

    def with_device(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Task:
        """A shallow copy of this task that lives on ``device`` (and ``dtype``)."""
        new = copy.copy(self)
        new.device = torch.device(device)
        new.dtype = dtype if dtype is not None else self.dtype
        return new


class TaskFamily(abc.ABC):
    """A distribution over tasks. Subclasses implement ``sample``.

    A subclass's ``sample`` is checked on every call: a result that is not a :class:`Task`
    raises ``TypeError`` naming the family, instead of an ``AttributeError`` wherever the
    task is first used.
    """

    name: str = "family"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        draw = cls.__dict__.get("sample")
        if draw is None or getattr(draw, "__isabstractmethod__", False):
            return

        @functools.wraps(draw)
        def sample(self: TaskFamily, generator: torch.Generator) -> Task:
            task = draw(self, generator)
            if not isinstance(task, Task):
                raise TypeError(
                    f"task family {self.name!r} ({type(self).__name__}): sample() returned "
                    f"a {type(task).__name__}, not a tasks.Task"
                )
            return task

        cls.sample = sample  # type: ignore[method-assign]

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task; all randomness comes from ``generator``."""


class TaskSuite(abc.ABC):
    """Named domains for leave-one-domain-out meta-learning.

    Subclasses set ``name`` and ``domains`` and implement ``task(domain)``.
    """

    name: str = "suite"
    domains: Sequence[str] = ()

    @abc.abstractmethod
    def task(self, domain: str) -> Task:
        """The task of one domain (validated with ``check_domain``)."""

    def check_domain(self, domain: str, field_name: str = "domain") -> str:
        domain = str(domain)
        if domain not in self.domains:
            raise ValueError(
                f"{field_name}={domain!r} is not a domain of suite {self.name!r}; "
                f"choose one of {list(self.domains)}"
            )
        return domain

    def meta_train_tasks(self, holdout: str) -> list[Task]:
        """One task per domain except ``holdout``."""
        holdout = self.check_domain(holdout, "holdout")
        return [self.task(d) for d in self.domains if d != holdout]

    def meta_test_task(self, holdout: str) -> Task:
        """The held-out domain's task."""
        return self.task(self.check_domain(holdout, "holdout"))

    def sample_task(self, generator: torch.Generator, holdout: str | None = None) -> Task:
        """A training task drawn at random (uniform over domains other than ``holdout``)."""
        names = [d for d in self.domains if d != holdout]
        if holdout is not None:
            self.check_domain(holdout, "holdout")
        i = int(torch.randint(len(names), (1,), generator=generator))
        return self.task(names[i])
