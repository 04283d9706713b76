"""What every meta-learner is: the :class:`MetaLearner` protocol, its history record and
the learned optimizer it produces.

APO (online), MetaMD and its competitors (offline) all satisfy :class:`MetaLearner`, and
``meta_train`` drives any learner through it alone::

    while learner.meta_steps < n:
        record = learner.meta_step()          # one meta-update
    learned = learner.learned_optimizer()     # preconditioner + rule + hyperparameters
    metaopt.save_learned_optimizer(learned, "opt.safetensors")

The product, :class:`~metaopt.optim.LearnedOptimizer`, lives with the optimizers it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from metaopt.optim.learned import LearnedOptimizer
from metaopt.registry import Registry

__all__ = [
    "META_OPTIMIZERS",
    "LearnedOptimizer",
    "MetaLearner",
    "MetaStep",
    "make_meta_optimizer",
]


@dataclass
class MetaStep:
    """One meta-update, as every learner records it (``learner.history``).

    Attributes:
        step: meta-updates done, this one included.
        meta_objective: the meta-objective this update descended (mean over its tasks).
        hypergrad_norm: Euclidean norm of the meta-gradient applied (``nan``: none applied).
        seconds: wall time of the meta-step.
        skipped: tasks (offline) or meta-updates (online) dropped as non-finite.
        extra: learner-specific floats (``train_loss``, adapted hyperparameters, ...).
    """

    step: int
    meta_objective: float
    hypergrad_norm: float
    seconds: float
    skipped: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """A flat record (``metrics.jsonl``): the fields, then ``extra``."""
        return {
            "step": self.step,
            "meta_objective": self.meta_objective,
            "hypergrad_norm": self.hypergrad_norm,
            "seconds": self.seconds,
            "skipped": self.skipped,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MetaStep:
        core = ("step", "meta_objective", "hypergrad_norm", "seconds", "skipped")
        extra = {k: float(v) for k, v in record.items() if k not in core}
        return cls(
            int(record["step"]),
            float(record["meta_objective"]),
            float(record["hypergrad_norm"]),
            float(record["seconds"]),
            int(record.get("skipped", 0)),
            extra,
        )


@runtime_checkable
class MetaLearner(Protocol):
    """The one interface of every meta-learner (APO, MetaMD, MetaSGD, MetaCurvature).

    Attributes:
        meta_steps: meta-updates done.
        history: one :class:`MetaStep` per meta-update.
    """

    meta_steps: int
    history: list[MetaStep]

    def meta_step(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> MetaStep:
        """One meta-update. Offline learners split their tasks over ``world_size`` ranks and
        sum across them with ``all_reduce`` (in place); online ones run in one process."""
        ...

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the meta-optimizer updates."""
        ...

    def learned_optimizer(self) -> LearnedOptimizer:
        """The optimizer learned so far (deploy it with ``.build(params)``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: meta-optimizers by name: ``factory(params, lr) -> torch.optim.Optimizer``
META_OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("meta_optimizer")


def _fusable(params: list[Tensor]) -> bool:
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )


@META_OPTIMIZERS.register("adam")
def _adam(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    # Adam's fused kernel (CPU and CUDA): one pass over the meta-parameters instead of one
    # per elementwise op; the same update rule
    return torch.optim.Adam(params, lr=lr, **({"fused": True} if _fusable(params) else {}))


META_OPTIMIZERS.register("sgd", lambda params, lr: torch.optim.SGD(params, lr=lr))
META_OPTIMIZERS.register("rmsprop", lambda params, lr: torch.optim.RMSprop(params, lr=lr))


def make_meta_optimizer(name: str, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """The meta-optimizer ``name`` (``"adam"``, ``"sgd"``, ``"rmsprop"``) over ``params``.

    Fused kernels do not bump version counters, which the families' factor caches key on:
    learners call ``torch.autograd.graph.increment_version`` after each meta-update."""
    return META_OPTIMIZERS[name](list(params), lr)
