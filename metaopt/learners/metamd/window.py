"""One task's inner run, cut into windows, as a :class:`~metaopt.hypergrad.Problem`.

An :class:`InnerRun` holds one task's run in flight: its model (for the functional
forward), the initial parameters ``theta_1``, the batch stream, the flat state (parameters,
the rule's state, running sums of the window's losses) and the step count. Its
:meth:`InnerRun.window` builds the problem an engine differentiates: ``steps`` applications
of the deployed update (:func:`metaopt.optim.update.preconditioned_step`) with the
preconditioner's meta-parameters substituted, and the meta-objective at the window's end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.func import bind_parameters, functional_forward
from metaopt.hypergrad.problem import Problem
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.objectives.base import MetaContext, evaluate_meta_objective
from metaopt.optim.rules import UpdateRule
from metaopt.optim.update import preconditioned_step

__all__ = ["InnerRun", "StateLayout"]


@dataclass(frozen=True)
class StateLayout:
    """How ``(theta, rule states, running sums)`` pack into a flat tuple of tensors.

    The parameters come first (``names`` order), then each parameter's rule-state fields
    that hold tensors, then the window's sums of the losses and of their logs.
    """

    names: tuple[str, ...]
    fields: tuple[str, ...]
    state_type: type[Any]

    @classmethod
    def of(
        cls, rule: UpdateRule, hp: Mapping[str, Any], params: Mapping[str, Tensor]
    ) -> StateLayout:
        probe = rule.init(next(iter(params.values())), hp)
        fields = tuple(f for f, v in zip(probe._fields, probe, strict=True) if v is not None)
        return cls(tuple(params), fields, rule.state_type)

    def pack(
        self, theta: Mapping[str, Tensor], states: Mapping[str, Any], sums: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, ...]:
        flat = [theta[n] for n in self.names]
        for n in self.names:
            flat.extend(getattr(states[n], f) for f in self.fields)
        return (*flat, *sums)

    def unpack(
        self, flat: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], dict[str, Any], tuple[Tensor, Tensor]]:
        n, k = len(self.names), len(self.fields)
        theta = dict(zip(self.names, flat[:n], strict=True))
        states = {}
        for i, name in enumerate(self.names):
            values = dict(zip(self.fields, flat[n + i * k : n + (i + 1) * k], strict=True))
            states[name] = self.state_type(**{f: values.get(f) for f in self.state_type._fields})
        return theta, states, (flat[-2], flat[-1])


@dataclass
class InnerRun:
    """One task's inner run in flight (see the module docstring).

    Attributes:
        task: the task (``make_model``, ``train_batches``, ``loss``, ``batches``).
        init_seed, data_seed: the run's initialisation and batch-order seeds.
        drawn_at: the meta-step at which the run was drawn (to re-draw it on resume).
        t: inner steps done.
        end: the step at which the run ends (``inner_steps``, or fewer for a first run
            that starts staggered).
        carry: the engine's state for this run (Persistent ES), ``None`` otherwise.
    """

    task: Any
    init_seed: int
    data_seed: int
    drawn_at: int
    model: nn.Module
    layout: StateLayout
    theta1: dict[str, Tensor]
    state: tuple[Tensor, ...]
    stream: Any
    meta_batch: tuple[Tensor, Tensor]
    val_batch: tuple[Tensor, Tensor]
    t: int = 0
    end: int = 0
    carry: Any = None
    _forward: Callable[..., Tensor] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        task: Any,
        init_seed: int,
        data_seed: int,
        drawn_at: int,
        rule: UpdateRule,
        hp: Mapping[str, Any],
        batch_size: int | None,
    ) -> InnerRun:
        model = task.make_model(init_seed)
        theta1 = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        layout = StateLayout.of(rule, hp, theta1)
        states = {n: rule.init(p, hp) for n, p in theta1.items()}
        zero = torch.zeros((), dtype=_sum_dtype(theta1), device=next(iter(theta1.values())).device)
        state = layout.pack(theta1, states, (zero, zero))
        stream = task.train_batches(data_seed, batch_size=batch_size)
        meta_batch = next(task.train_batches(data_seed + 1, batch_size=batch_size))
        val_batch = next(iter(task.batches("val", batch_size)))
        return cls(task, init_seed, data_seed, drawn_at, model, layout, theta1, state, stream,
                   meta_batch, val_batch)  # fmt: skip

    @property
    def forward(self) -> Callable[..., Tensor]:
        if self._forward is None:
            self._forward = functional_forward(self.model)
        return self._forward

    def window(
        self,
        steps: int,
        pre: KroneckerPreconditioner,
        rule: UpdateRule,
        hp: Mapping[str, Any],
        *,
        lr: float,
        compose: str,
        meta_objective: str,
        objective_options: Mapping[str, Any],
        meta_step: int,
    ) -> Problem:
        """The next ``steps`` inner steps as a problem (draws their batches now)."""
        batches = [next(self.stream) for _ in range(steps)]
        task, forward, layout, t0 = self.task, self.forward, self.layout, self.t
        call = bind_parameters(pre)
        names = list(layout.names)

        def step(
            state: tuple[Tensor, ...], hparams: tuple[Tensor, ...], i: int
        ) -> tuple[Tensor, ...]:
            theta, states, (loss_sum, log_sum) = layout.unpack(state)
            if i == 0:  # the sums are the window's own, whatever state it starts from
                loss_sum, log_sum = torch.zeros_like(loss_sum), torch.zeros_like(log_sum)
            x, y = batches[i]
            zero = None
            if y.is_floating_point() and hparams:
                # torch 2.x: mse_loss's forward-over-reverse formula writes into the tangent
                # of whichever input has none (an immutable ZeroTensor) when the other has
                # one -- the target, under the forward engine's jvp; a zero that depends on
                # the meta-parameters (+ 0 * phi) gives both a tangent and changes no value
                zero = 0 * hparams[0].reshape(-1)[0]
                y = y + zero.to(y.dtype)

            def loss_fn(th: dict[str, Tensor]) -> Tensor:
                pred = forward(th, x)
                return task.loss(pred if zero is None else pred + zero.to(pred.dtype), y)

            # torch.func.grad: pure (forward mode and ES can run it) and differentiable by
            # reverse-mode autograd (second order through the step)
            grads, loss = torch.func.grad_and_value(loss_fn)(theta)
            new, new_states = call(
                hparams,
                lambda p: preconditioned_step(
                    theta, grads, states, p, rule, hp, lr, compose=compose, count=t0 + i + 1
                ),
            )
            sums = (loss_sum + loss.to(loss_sum.dtype), log_sum + torch.log(loss).to(log_sum.dtype))
            return layout.pack(new, new_states, sums)

        def objective(state: tuple[Tensor, ...], hparams: tuple[Tensor, ...]) -> Tensor:
            theta, _, (loss_sum, log_sum) = layout.unpack(state)

            def evaluate(p: KroneckerPreconditioner) -> Tensor:
                ctx = MetaContext(
                    params_before=self.theta1,
                    params_after=theta,
                    forward=forward,
                    loss=task.loss,
                    batch=self.meta_batch,
                    preconditioner=p,
                    step=meta_step,
                    extras={"task": task},
                    train_loss_mean=loss_sum / steps,
                    train_log_loss_mean=log_sum / steps,
                    val_batch=self.val_batch,
                )
                return evaluate_meta_objective(meta_objective, ctx, **objective_options)

            return call(hparams, evaluate)

        inner_objective, closed_form = None, {}
        if pre.has_metric:
            theta1 = self.theta1

            def inner_objective(ps: tuple[Tensor, ...], hparams: tuple[Tensor, ...]) -> Tensor:
                # the rephrased inner objective of MetaMD Eq. 13: B_M(theta || theta_1)
                return call(hparams, lambda p: p.bregman(dict(zip(names, ps, strict=True)), theta1))

            def inverse_mixed(
                v: tuple[Tensor, ...], ps: tuple[Tensor, ...], hparams: tuple[Tensor, ...]
            ) -> tuple[Tensor, ...]:
                # (d^2 B_M / d phi d theta)^T M^{-1} v in one call, with pre's own parameters
                # (equal to hparams: the implicit engine differentiates at the current phi)
                named = dict(zip(names, ps, strict=True))
                return pre.bregman_inverse_mixed(dict(zip(names, v, strict=True)), named, theta1)

            closed_form = {"inverse_mixed": inverse_mixed}
        return Problem(
            step=step,
            state=self.state,
            hparams=tuple(pre.parameters()),
            steps=steps,
            objective=objective,
            num_params=len(names),
            inner_objective=inner_objective,
            closed_form=closed_form,
        )

    def window_mean_loss(self, state: tuple[Tensor, ...], steps: int) -> Tensor:
        """The mean training loss of a window (0-dim, float64), from its end state's sum."""
        return self.layout.unpack(state)[2][0].double() / steps


def _sum_dtype(params: Mapping[str, Tensor]) -> torch.dtype:
    return torch.promote_types(next(iter(params.values())).dtype, torch.float32)
