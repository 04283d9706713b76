"""``--learner apo``: APO-Precond run online through the training domains in turn.

APO (``metaopt.APO(model, loss_fn, adapt="precond")``) learns its EKFAC-shaped
preconditioner during one training run. Here that run visits the suite's training domains
one after another, ``steps_per_domain`` training steps each (cycling if more steps are
asked for), re-initialising the model on every new domain (seeded by ``(seed, visit)``)
while the preconditioner and its meta-optimizer carry over. The learned preconditioner is
the same kind of artefact MetaMD produces (``preconditioner.safetensors``, deployed with
``learned:<path>`` / ``metaopt.optim.Preconditioned``).

It implements the OuterLearner protocol so the pipeline's checkpoints, metrics and plots
serve it unchanged: one outer step = ``meta_interval`` APO training steps, i.e. exactly one
meta-update (the first of them). Its state holds APO's state, the model's parameters, the
domain visit and position, and both batch streams' positions. It is single-process (online
training has no tasks to split), so the CLI refuses it under torchrun.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from meta_train.config import TrainConfig

__all__ = ["APOOnline", "build_apo"]

_MIX = 0x9E3779B97F4A7C15


class APOOnline:
    """APO-Precond through a sequence of training domains (see the module docstring).

    Args:
        source: a list of Tasks (visited in order) or a family (one task drawn per visit).
        seed: seeds initialisations, task draws and batch orders.
        steps_per_domain: training steps on each domain before moving to the next.
        **apo_options: :class:`metaopt.APOConfig` fields (``adapt`` is ``"precond"``).
    """

    def __init__(
        self, source: Any, *, seed: int = 0, steps_per_domain: int = 200, **apo_options: Any
    ) -> None:
        from metaopt import APO

        if isinstance(steps_per_domain, bool) or steps_per_domain < 1:
            raise ValueError(f"steps_per_domain={steps_per_domain!r}: must be a positive integer")
        if "adapt" in apo_options and apo_options["adapt"] != "precond":
            raise ValueError(f"adapt={apo_options['adapt']!r}: the apo learner adapts 'precond'")
        self.source = source
        self.seed = int(seed)
        self.steps_per_domain = int(steps_per_domain)
        self.visit = 0
        self.task = self._task(0)
        self.model = self.task.make_model(self._seed(0))
        self.apo = APO(self.model, self.task.loss, adapt="precond", **apo_options)
        self.preconditioner = self.apo.preconditioner
        self._last_grad_norm = float("nan")
        self.apo.meta_optimizer.register_step_pre_hook(self._record_grad_norm)
        self.step = 0
        self.domain_step = 0
        self._open_streams()

    # --- domains ---------------------------------------------------------------------------
    def _seed(self, visit: int) -> int:
        return (self.seed * _MIX + visit) % (2**31 - 1)

    def _task(self, visit: int) -> Any:
        if isinstance(self.source, list | tuple):
            return self.source[visit % len(self.source)]
        return self.source.sample(torch.Generator().manual_seed(self._seed(visit)))

    def _open_streams(self) -> None:
        s = self._seed(self.visit)
        self.stream = self.task.train_batches(s)
        self.fsd_stream = self.task.train_batches(s + 1)  # B', drawn on meta steps only

    def _next_domain(self) -> None:
        self.visit += 1
        self.domain_step = 0
        self.task = self._task(self.visit)
        fresh = self.task.make_model(self._seed(self.visit))
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), fresh.parameters(), strict=True):
                p.copy_(q)
        self.apo.state = {}  # momentum of the old domain's run does not carry over
        self._open_streams()

    # --- OuterLearner ------------------------------------------------------------------------
    def _record_grad_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = sum((g.double() ** 2).sum() for g in grads) if grads else torch.zeros(())
        self._last_grad_norm = float(torch.as_tensor(total).sqrt())

    def outer_step(self, *, rank: int = 0, world_size: int = 1, all_reduce: Any = None) -> dict:
        """``meta_interval`` APO steps (one meta-update); single process only."""
        if world_size != 1:
            raise ValueError(f"world_size={world_size}: the apo learner runs in one process")
        start = time.perf_counter()
        skipped_before = self.apo.skipped_meta_steps
        self._last_grad_norm = float("nan")
        meta_value, losses = None, []
        for _ in range(self.apo.config.meta_interval):
            if self.domain_step == self.steps_per_domain:
                self._next_domain()
            stats = self.apo.step(next(self.stream), fsd_batch=lambda: next(self.fsd_stream))
            if stats["meta_objective"] is not None:
                meta_value = stats["meta_objective"]
            losses.append(stats["loss"].detach())
            self.domain_step += 1
        self.step += 1
        return {
            "meta_objective": float(meta_value) if meta_value is not None else float("nan"),
            "hypergrad_norm": self._last_grad_norm,
            "seconds": time.perf_counter() - start,
            "skipped_tasks": float(self.apo.skipped_meta_steps - skipped_before),
            "train_loss": float(torch.stack(losses).mean()),
            "domain_visit": float(self.visit),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "apo": self.apo.state_dict(),
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "step": self.step,
            "visit": self.visit,
            "domain_step": self.domain_step,
            "stream": self.stream.state_dict(),
            "fsd_stream": self.fsd_stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.visit = int(state["visit"])
        self.task = self._task(self.visit)
        self._open_streams()
        self.stream.load_state_dict(state["stream"])
        self.fsd_stream.load_state_dict(state["fsd_stream"])
        self.model.load_state_dict(state["model"])
        self.apo.load_state_dict(state["apo"])
        self.step = int(state["step"])
        self.domain_step = int(state["domain_step"])


def build_apo(config: TrainConfig, source: Any, device: str) -> APOOnline:
    """APO-Precond: ``inner_lr`` is APO's ``lr``, ``meta_lr`` / ``meta_optimizer`` its
    meta-optimizer's; ``--option`` sets any other :class:`metaopt.APOConfig` field."""
    import dataclasses

    from metaopt import APOConfig

    known = {f.name for f in dataclasses.fields(APOConfig)}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise ValueError(f"options: {unknown} are not APOConfig fields; allowed: {sorted(known)}")
    options = {
        "lr": config.inner_lr,
        "meta_lr": config.meta_lr,
        "meta_optimizer": config.meta_optimizer,
        **config.options,
    }
    return APOOnline(source, seed=config.seed, steps_per_domain=config.steps_per_domain, **options)
