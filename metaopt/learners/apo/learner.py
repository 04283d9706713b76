"""APO: Amortized Proximal Optimization (Bae et al. 2022, Algorithm 1), an online meta-learner.

Every ``K = meta_interval`` steps APO forms the one-step lookahead ``theta'(phi) =
u(theta, phi, B)``, evaluates a meta-objective on it (default ``"proximal"``:
``J_B(theta') + lambda_fsd * mean_{B'} D_F(theta', theta) + lambda_wsd/2 ||theta' - theta||^2``),
differentiates it with the one-step unroll engine
(:func:`metaopt.hypergrad.unrolled_grad`), updates ``phi`` with the meta-optimizer, and
then takes the real step ``theta <- u(theta, phi, B)``. Other steps are plain base steps
without host synchronisation. A plain training loop::

    apo = metaopt.APO(model, torch.nn.functional.cross_entropy, base="sgdm", adapt="lr")
    for x, y in loader:
        stats = apo.step((x, y), fsd_batch=draw_batch)   # draw_batch() -> (x', y')
    print(apo.hparam_log(), apo.history[-1])

Meta-objectives see a :class:`~metaopt.objectives.MetaContext` with ``params_before`` =
theta, ``params_after`` = theta', ``batch`` = B, ``fsd_batch`` = B', ``preconditioner``
(layer-lr / precond, else ``None``), ``step`` and ``extras``: ``"hparams"`` (the
meta-parameters by name, differentiable) and, with ``fresh_loss_batch``, ``"loss_batch"``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from metaopt.func import functional_forward, loss_and_grads, own_forward, trainable_params
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.apo.adapts import ADAPTS
from metaopt.learners.apo.config import APOConfig
from metaopt.learners.base import MetaStep, make_meta_optimizer
from metaopt.objectives import MetaContext, evaluate_meta_objective
from metaopt.objectives import proximal as _proximal  # noqa: F401  (registers "proximal")
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.rules import state_from_dict

__all__ = ["APO", "APOConfig"]

Batch = tuple[Tensor, Tensor]
BatchSource = Batch | Callable[[], Batch] | None


#: modules that couple the rows of a batch in training mode (batch statistics) or draw noise
#: per call, named by their public classes (torch has no public base class for either)
_BATCH_COUPLED = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip


def _rowwise(model: nn.Module) -> bool:
    """No module in training mode that couples rows (batch norm) or draws per-call noise
    (dropout): one forward of a concatenated batch then equals separate forwards."""
    return not any(m.training and isinstance(m, _BATCH_COUPLED) for m in model.modules())


class APO:
    """Online meta-learning of ``phi`` (learning rates, RMSprop/K-FAC constants, or a
    Kronecker preconditioner) during one training run.

    Args:
        model: the network; its trainable parameters are updated in place.
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean over the batch).
        config: an :class:`APOConfig`, or pass its fields as keyword arguments.
        data: an iterator of training batches ``(x, y)`` for :meth:`meta_step` (the
            :class:`~metaopt.learners.MetaLearner` interface: ``meta_train`` drives APO
            through it); not needed when you call :meth:`step` yourself.
        fsd_data: an iterator of the batches B' drawn on meta steps (``None``: none).

    Attributes:
        history: one :class:`~metaopt.learners.MetaStep` per meta-update; its ``extra``
            holds the training step (``"train_step"``) and the adapted hyperparameters
            after the update (as in :meth:`hparam_log`).
        step_count, meta_steps, skipped_meta_steps: counters (skipped: non-finite
            meta-gradient, meta-update not applied).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        config: APOConfig | None = None,
        *,
        data: Iterator[Batch] | None = None,
        fsd_data: Iterator[Batch] | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ValueError(f"pass either config or keyword options, not both: {sorted(options)}")
        self.config = config if config is not None else APOConfig(**options)
        self.model = model
        self.loss_fn = loss_fn
        self.forward = functional_forward(model)
        self._own_forward = own_forward(model)
        self.rule = ADAPTS[self.config.adapt](self.config, model)
        cfg = self.config
        self.meta_optimizer = make_meta_optimizer(
            cfg.meta_optimizer, self.meta_parameters(), cfg.meta_lr
        )
        self.data = data
        self.fsd_data = fsd_data
        self.state: dict[str, Any] = {}  # the base rule's state per parameter name
        self.step_count = 0
        self.meta_steps = 0
        self.skipped_meta_steps = 0
        self.history: list[MetaStep] = []
        ref = next(model.parameters())
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=ref.device)

    # --- public ------------------------------------------------------------------------
    @property
    def preconditioner(self) -> KroneckerPreconditioner | None:
        """The learned preconditioner (``"scalar"`` for layer-lr, ``"ekfac-shaped"`` for
        precond), else ``None``."""
        return self.rule.preconditioner

    @property
    def num_meta_parameters(self) -> int:
        return sum(p.numel() for p in self.rule.meta_parameters().values())

    def meta_parameters(self) -> list[nn.Parameter]:
        """``phi``: what the meta-optimizer updates."""
        return list(self.rule.meta_parameters().values())

    def learned_optimizer(self) -> LearnedOptimizer:
        """The optimizer APO has learned so far, deployable on another run: its
        preconditioner (``"precond"``, ``"layer-lr"``) or adapted hyperparameters with the
        base rule (``"lr"``, ``"rmsprop-eps-rho"``). ``"kfac-damping"`` has none (K-FAC's
        curvature is re-estimated by every run)."""
        return self.rule.learned_optimizer(self.rule.meta_parameters())

    def meta_step(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> MetaStep:
        """Training steps on ``data`` up to and including the next meta-update, then to
        the step before the following one (``meta_interval`` steps in a steady run).

        Online APO adapts one training run, so it runs in one process (``world_size``
        must be 1)."""
        if world_size != 1:
            raise ValueError(f"world_size={world_size}: APO adapts one run, in one process")
        if self.data is None:
            raise ValueError(
                "APO.meta_step: no batch source; construct APO(..., data=iterator of batches) "
                "or call apo.step(batch) yourself"
            )
        start = time.perf_counter()
        before = self.meta_steps + self.skipped_meta_steps  # meta-updates attempted
        done_before = self.meta_steps
        losses = []
        fsd = (lambda: next(self.fsd_data)) if self.fsd_data is not None else None
        while True:
            stats = self.step(next(self.data), fsd_batch=fsd)
            losses.append(stats["loss"].detach())
            attempted = self.meta_steps + self.skipped_meta_steps > before
            if attempted and self.step_count % self.config.meta_interval == 0:
                break
        if self.meta_steps > done_before:
            record = self.history[-1]
        else:  # the meta-gradient was not finite: no update, nothing in the history
            record = MetaStep(self.meta_steps, float("nan"), float("nan"), 0.0,
                              self.skipped_meta_steps)  # fmt: skip
        record.seconds = time.perf_counter() - start
        record.extra["train_loss"] = float(torch.stack(losses).mean())
        return record

    def reset_state(self) -> None:
        """Forget the base optimizer's state (momentum, moments) for a fresh run of the
        model; the meta-parameters and the meta-optimizer carry over."""
        self.state = {}
        self.rule.reset_state()

    def hparam_log(self) -> dict[str, float]:
        """Adapted hyperparameters now, as floats (one host sync)."""
        now = self.rule.current(self.rule.meta_parameters())
        if not now:
            return {}
        values = torch.stack([v.detach().reshape(()).double() for v in now.values()]).tolist()
        return dict(zip(now, values, strict=True))

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first step whose loss was non-finite."""
        bad = int(self._first_bad)
        if bad >= 0:
            raise FloatingPointError(
                f"APO: the training loss at step {bad} is not finite (the base update of step "
                f"{bad - 1} or the batch of step {bad} produced inf/nan); lower lr or check data"
            )

    def step(self, batch: Batch, fsd_batch: BatchSource = None) -> dict[str, Any]:
        """One training step on ``batch``; a meta-update first when ``step % K == 0``.

        Args:
            batch: ``(x, y)``, the batch B for the gradient (and the loss term).
            fsd_batch: B' for the FSD term: a batch, or a callable drawing one (called only
                on meta steps), or ``None`` (allowed when ``lambda_fsd == 0`` and the loss
                term uses B).

        Returns:
            ``{"loss": 0-dim tensor (on B, before the update), "meta_step": bool (a
            meta-update began this step), "meta_objective": 0-dim tensor on meta steps, else
            None, "skipped_meta_steps": int (so far), **hparams}`` where the hyperparameters
            are 0-dim tensors in linear space, keyed as in :meth:`hparam_log` (``lr``,
            ``eps``, ``rho``, ``damping``, ``lr/<layer>``); the meta-parameters themselves
            (``log_lr``, ...) are :meth:`meta_parameters`. Nothing here syncs the host.
        """
        cfg, t = self.config, self.step_count
        meta_now = t % cfg.meta_interval == 0
        if meta_now or cfg.check_every_step:
            self.check_finite()
        # gradient at the model's own parameters (no functional_call swap; same arithmetic)
        params = trainable_params(self.model)
        loss, grads = loss_and_grads(self._own_forward, self.loss_fn, params, batch)
        theta = {n: p.detach() for n, p in params.items()}
        self._first_bad = torch.where(
            (self._first_bad < 0) & ~torch.isfinite(loss).reshape(()),
            torch.full_like(self._first_bad, t),
            self._first_bad,
        )
        if cfg.check_every_step:
            self.check_finite()
        meta_value = self._meta_update(theta, grads, batch, fsd_batch) if meta_now else None
        meta = {k: v.detach() for k, v in self.rule.meta_parameters().items()}
        # the real update, in place on the model's parameters and the base state
        self.state = self.rule.apply_(params, grads, self.state, meta, step=t)
        self.rule.after_step()
        self.step_count += 1
        return {
            "loss": loss,
            "meta_step": meta_now,
            "meta_objective": meta_value,
            "skipped_meta_steps": self.skipped_meta_steps,
            **self.rule.current(meta),
        }

    # --- meta-update -------------------------------------------------------------------
    def _draw(self, source: BatchSource) -> Batch | None:
        return source() if callable(source) else source

    def _meta_update(self, theta, grads, batch, fsd_source) -> Tensor | None:
        from metaopt.hypergrad import NonFiniteHypergradient, unrolled_grad

        cfg, t = self.config, self.step_count
        fsd_batch = self._draw(fsd_source)
        if fsd_batch is None and (cfg.lambda_fsd > 0 or cfg.fresh_loss_batch):
            raise ValueError(
                "fsd_batch=None: needed on meta steps when lambda_fsd > 0 or fresh_loss_batch "
                "(pass a batch or a callable drawing one)"
            )
        names = list(theta)
        meta_params = self.rule.meta_parameters()
        meta_names = list(meta_params)
        before = {n: v.detach() for n, v in theta.items()}
        state = dict(self.state)
        options: dict[str, Any] = {}
        if cfg.meta_objective == "proximal":
            options = {"lambda_fsd": cfg.lambda_fsd, "lambda_wsd": cfg.lambda_wsd, "fsd": cfg.fsd}
        options.update(cfg.objective_options)
        extras: dict[str, Any] = {}
        if cfg.fresh_loss_batch:
            extras["loss_batch"] = fsd_batch
        values: list[Tensor] = []

        # g = grad J_B(theta) does not depend on phi at a one-step unroll from theta
        def step_fn(params: tuple[Tensor, ...], hparams: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            p = dict(zip(names, params, strict=True))
            m = dict(zip(meta_names, hparams, strict=True))
            new = self.rule.lookahead(p, grads, state, m, step=t)
            return tuple(new[n] for n in names)

        def outer(params: tuple[Tensor, ...], hparams: tuple[Tensor, ...]) -> Tensor:
            ctx = MetaContext(
                params_before=before,
                params_after=dict(zip(names, params, strict=True)),
                forward=self.forward,
                loss=self.loss_fn,
                batch=batch,
                fsd_batch=fsd_batch,
                preconditioner=self.rule.preconditioner,
                step=t,
                extras={**extras, "hparams": dict(zip(meta_names, hparams, strict=True))},
                rowwise=cfg.joint_forward and _rowwise(self.model),
            )
            value = evaluate_meta_objective(cfg.meta_objective, ctx, **options)
            values.append(value.detach())
            return value

        hparams = tuple(meta_params.values())
        try:
            with self.rule.paused():
                meta_grads = unrolled_grad(
                    step_fn, outer, tuple(before[n] for n in names), hparams, steps=1
                )
        except NonFiniteHypergradient:
            self.skipped_meta_steps += 1
            return values[-1] if values else None
        for p, g in zip(hparams, meta_grads, strict=True):
            p.grad = g.detach().to(p.dtype)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in meta_grads)))
        self.meta_optimizer.step()
        # the fused kernel updates in place without bumping version counters, which the
        # rules' caches (S^2, float lr) key on: bump them so every cache sees the update
        increment_version(list(self.rule.meta_parameters().values()))
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_steps += 1
        value = values[-1] if values else None
        self.history.append(
            MetaStep(
                self.meta_steps,
                float("nan") if value is None else float(value),
                norm,
                0.0,
                self.skipped_meta_steps,
                {"train_step": float(t), **self.hparam_log()},
            )
        )
        return value

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Meta-parameters, meta-optimizer and base-optimizer state, counters, history.

        The model's own parameters are not included (save ``model.state_dict()`` too).
        """
        return {
            "config": asdict(self.config),
            "meta": {k: v.detach().clone() for k, v in self.rule.meta_parameters().items()},
            "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
            "base_state": {n: _as_dict(s) for n, s in self.state.items()},
            "step_count": self.step_count,
            "meta_steps": self.meta_steps,
            "skipped_meta_steps": self.skipped_meta_steps,
            "history": [r.as_dict() for r in self.history],
            "data": _state_of(self.data),
            "fsd_data": _state_of(self.fsd_data),
            "first_bad": self._first_bad.clone(),
            "rule": self.rule.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same ``adapt``/``base`` and model)."""
        saved = state["config"]
        for key in ("adapt", "base"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"state_dict: {key}={saved[key]!r} but this APO has "
                    f"{key}={getattr(self.config, key)!r}"
                )
        meta = self.rule.meta_parameters()
        if set(state["meta"]) != set(meta):
            raise ValueError("state_dict: meta-parameters do not match this model/adapt")
        with torch.no_grad():
            for k, v in state["meta"].items():
                meta[k].copy_(v)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group in self.meta_optimizer.param_groups:  # a resumed run may change meta_lr
            group["lr"] = self.config.meta_lr
        ref = next(self.model.parameters())
        self.state = {
            n: state_from_dict({k: None if v is None else v.to(ref.device) for k, v in s.items()})
            for n, s in state["base_state"].items()
        }
        self.step_count = int(state["step_count"])
        self.meta_steps = int(state["meta_steps"])
        self.skipped_meta_steps = int(state["skipped_meta_steps"])
        self.history = [MetaStep.from_dict(r) for r in state["history"]]
        for source, saved in (
            (self.data, state.get("data")),
            (self.fsd_data, state.get("fsd_data")),
        ):
            if saved is not None and hasattr(source, "load_state_dict"):
                source.load_state_dict(saved)
        self._first_bad = state["first_bad"].to(ref.device).clone()
        self.rule.load_extra_state(state["rule"])


def _state_of(source: Any) -> Any:
    """A batch source's position (``BatchStream``-like sources have ``state_dict``)."""
    return source.state_dict() if hasattr(source, "state_dict") else None


def _as_dict(state: Any) -> dict[str, Any]:
    return {k: None if v is None else v.clone() for k, v in state._asdict().items()}
