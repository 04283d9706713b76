"""``--learner apo``: APO-Precond learning online through the training domains in turn.

APO (``metaopt.APO(model, loss_fn, adapt="precond")``) learns its EKFAC-shaped preconditioner
during one training run. Here that run visits the suite's training domains one after
another, ``steps_per_domain`` training steps each (cycling if more steps are asked for),
re-initialising the model on every new domain (seeded by ``(seed, visit)``) while the
preconditioner and its meta-optimizer carry over. :class:`DomainCycle` is that batch
source; APO itself is the learner the pipeline drives (``meta_step``: ``meta_interval``
training steps, one meta-update). Its learned optimizer is the same kind of file MetaMD
writes. It runs in one process (online training has no tasks to split).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from meta_train.config import TrainConfig

__all__ = ["DomainCycle", "build_apo"]

_MIX = 0x9E3779B97F4A7C15


class DomainCycle(Iterator[tuple[Tensor, Tensor]]):
    """Training batches of the source's domains in turn, ``steps_per_domain`` each.

    At a domain change the model's parameters are re-initialised in place (the new task's
    ``make_model``) and ``on_new_domain()`` is called (APO resets its base-optimizer state).
    ``fsd`` is a second iterator drawing the batches B' of the current domain.

    Args:
        source: a list of Tasks (visited in order) or a family (one task drawn per visit).
        model: the model being trained (its parameters are overwritten at each change).
        seed: seeds initialisations, task draws and batch orders.
        steps_per_domain: training steps on each domain before moving to the next.
        task: the first visit's task when the caller has drawn it already (``None``: drawn
            here; a family's draw is not free).
    """

    def __init__(
        self,
        source: Any,
        model: nn.Module,
        *,
        seed: int,
        steps_per_domain: int,
        task: Any = None,
    ) -> None:
        if isinstance(steps_per_domain, bool) or steps_per_domain < 1:
            raise ValueError(f"steps_per_domain={steps_per_domain!r}: must be a positive integer")
        self.source = source
        self.model = model
        self.seed = int(seed)
        self.steps_per_domain = int(steps_per_domain)
        self.on_new_domain: Callable[[], None] = lambda: None
        self.visit = 0
        self.domain_step = 0
        self.task = self._task(0) if task is None else task
        self._open_streams()
        self.fsd = _Draw(self)

    @classmethod
    def start(cls, source: Any, *, seed: int, steps_per_domain: int) -> DomainCycle:
        """A cycle with a fresh model of the first domain's task."""
        first = _task_of(source, _seed(seed, 0))
        model = first.make_model(_seed(seed, 0))
        return cls(source, model, seed=seed, steps_per_domain=steps_per_domain, task=first)

    def _task(self, visit: int) -> Any:
        return _task_of(self.source, _seed(self.seed, visit), visit)

    def _open_streams(self) -> None:
        s = _seed(self.seed, self.visit)
        self.stream = self.task.train_batches(s)
        self.fsd_stream = self.task.train_batches(s + 1)  # B', drawn on meta steps only

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.domain_step == self.steps_per_domain:
            self.visit += 1
            self.domain_step = 0
            self.task = self._task(self.visit)
            fresh = self.task.make_model(_seed(self.seed, self.visit))
            with torch.no_grad():
                for p, q in zip(self.model.parameters(), fresh.parameters(), strict=True):
                    p.copy_(q)
            self.on_new_domain()
            self._open_streams()
        self.domain_step += 1
        return next(self.stream)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "visit": self.visit,
            "domain_step": self.domain_step,
            "stream": self.stream.state_dict(),
            "fsd_stream": self.fsd_stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.visit = int(state["visit"])
        self.domain_step = int(state["domain_step"])
        self.task = self._task(self.visit)
        self._open_streams()
        self.stream.load_state_dict(state["stream"])
        self.fsd_stream.load_state_dict(state["fsd_stream"])
        self.model.load_state_dict(state["model"])


class _Draw(Iterator[tuple[Tensor, Tensor]]):
    """The current domain's B' batches (APO draws one per meta step)."""

    def __init__(self, cycle: DomainCycle) -> None:
        self.cycle = cycle

    def __next__(self) -> tuple[Tensor, Tensor]:
        return next(self.cycle.fsd_stream)


def _seed(seed: int, visit: int) -> int:
    return (int(seed) * _MIX + visit) % (2**31 - 1)


def _task_of(source: Any, seed: int, visit: int = 0) -> Any:
    if isinstance(source, list | tuple):
        return source[visit % len(source)]
    return source.sample(torch.Generator().manual_seed(seed))


def build_apo(config: TrainConfig, source: Any, device: str) -> Any:
    """APO-Precond: ``inner_lr`` is APO's ``lr``, ``meta_lr`` / ``meta_optimizer`` its
    meta-optimizer's; ``--option`` sets any other :class:`metaopt.APOConfig` field."""
    import dataclasses

    from metaopt import APO, APOConfig

    known = {f.name for f in dataclasses.fields(APOConfig)}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise ValueError(f"options: {unknown} are not APOConfig fields; allowed: {sorted(known)}")
    if config.options.get("adapt", "precond") != "precond":
        raise ValueError(
            f"adapt={config.options['adapt']!r}: the apo learner adapts 'precond' (the only "
            "adapt that produces a preconditioner file)"
        )
    settings = {"lr": config.inner_lr, "meta_lr": config.meta_lr,
                "meta_optimizer": config.meta_optimizer}  # fmt: skip
    options = {k: v for k, v in settings.items() if v is not None}
    options.update(config.options)
    cycle = DomainCycle.start(source, seed=config.seed, steps_per_domain=config.steps_per_domain)
    apo = APO(cycle.model, cycle.task.loss, data=cycle, fsd_data=cycle.fsd,
              **{"adapt": "precond", **options})  # fmt: skip
    cycle.on_new_domain = apo.reset_state
    return apo
