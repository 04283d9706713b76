"""What every registered engine is given: one window of an inner run (:class:`Problem`).

A meta-learner trains a model in an inner loop whose update depends on meta-parameters
``lambda``, and wants ``d E / d lambda`` for a meta-objective ``E`` of that run. It hands
an engine a :class:`Problem`: a start state, a pure step map, the number of steps in the
window and the objective at the window's end. Engines differ in how they differentiate
(backpropagation through the window, forward mode, the implicit function theorem at its
end, evolution strategies) but not in what they are asked; each returns an
:class:`EngineResult` with the window's end state, so a learner can continue the same
inner run in its next window (truncated training: Metz et al. 2019, learned_optimization's
``truncated_step``). Engines that keep state across windows (Persistent ES) hand it back as
``carry``; the learner passes it to the next call and ``None`` when the inner run restarts.

Conventions (what makes one signature serve every engine):

* a state is a flat tuple of tensors; its first ``num_params`` entries are the inner
  parameters ``theta`` (the rest: optimizer state, running sums the objective reads);
* ``step(state, hparams, i)`` is the ``i``-th step of the window (``i = 0 .. steps-1``); it
  must be pure (``torch.func.grad`` for gradients, no in-place updates of its inputs), so
  that reverse mode, forward mode and ES can all run it;
* ``objective(state, hparams)`` is the meta-objective at the window's end (a trajectory
  objective reads running sums that ``step`` carried in the state);
* implicit engines also need ``inner_objective(params, hparams)``, the function whose
  stationary point the window's end is, and optionally closed-form pieces
  (``inverse_hvp``, ``mixed_product``, ``inverse_mixed``, ``inner_grad``; see
  :func:`~metaopt.hypergrad.implicit_grad`) that the problem knows for its own structure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["EngineResult", "Problem", "apply_step", "run_window"]

State = tuple[Tensor, ...]
Hparams = tuple[Tensor, ...]


@dataclass
class Problem:
    """One window of an inner run (see the module docstring).

    Attributes:
        step: ``step(state, hparams, i) -> state``, pure.
        state: the window's start state (tensors need not require grad).
        hparams: the meta-parameters ``lambda`` (one tensor per meta-parameter).
        steps: number of steps in the window (>= 1).
        objective: ``objective(end_state, hparams) -> 0-dim tensor``.
        num_params: how many leading entries of a state are ``theta``.
        inner_objective: ``inner(params, hparams) -> 0-dim tensor`` whose stationary point
            the end of the window is (implicit engines only).
        closed_form: closed-form pieces for implicit engines (``inverse_hvp``,
            ``mixed_product``, ``inverse_mixed``, ``inner_grad``), each a callable.
    """

    step: Callable[[State, Hparams, int], Sequence[Tensor]]
    state: State
    hparams: Hparams
    steps: int
    objective: Callable[[State, Hparams], Tensor]
    num_params: int
    inner_objective: Callable[[State, Hparams], Tensor] | None = None
    closed_form: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be a positive integer")
        self.state = tuple(self.state)
        self.hparams = tuple(self.hparams)
        if not 0 < self.num_params <= len(self.state):
            raise ValueError(
                f"num_params={self.num_params!r}: must be in [1, len(state)={len(self.state)}]"
            )

    def params(self, state: State) -> State:
        """The ``theta`` part of ``state``."""
        return tuple(state[: self.num_params])

    def with_params(self, state: State, params: Sequence[Tensor]) -> State:
        """``state`` with its ``theta`` part replaced by ``params``."""
        return (*params, *state[self.num_params :])


@dataclass
class EngineResult:
    """What an engine returns.

    Attributes:
        grads: ``d E / d lambda``, one detached tensor per hparam.
        value: ``E`` over the window (a detached 0-dim tensor; for ES the mean over its
            perturbed runs).
        state: the window's end state (detached), where the inner run continues.
        carry: engine state for the next window of the same inner run (``None``: none).
    """

    grads: tuple[Tensor, ...]
    value: Tensor
    state: State
    carry: Any = None


def apply_step(
    step: Callable[[State, Hparams, int], Sequence[Tensor]], state: State, hparams: Hparams, i: int
) -> State:
    """``step(state, hparams, i)`` as a tuple, checked to keep the state's length."""
    out = tuple(step(state, hparams, i))
    if len(out) != len(state):
        raise ValueError(f"step returned {len(out)} tensors for a state of {len(state)}")
    return out


def run_window(problem: Problem, state: State, hparams: Hparams) -> tuple[State, Tensor]:
    """``(end state, objective)``: the window's ``steps`` from ``state`` under ``hparams``."""
    for i in range(problem.steps):
        state = apply_step(problem.step, state, hparams, i)
    return state, problem.objective(state, hparams)


def detached(state: Sequence[Tensor]) -> State:
    return tuple(t.detach() for t in state)


def finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is finite (one host sync)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
