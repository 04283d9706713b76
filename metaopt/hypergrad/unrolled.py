"""Hypergradients through an unrolled inner loop ``theta_{t+1} = step(theta_t, lambda)``.

``d outer(theta_T(lambda), lambda) / d lambda`` for ``T = steps`` applications of ``step``:

* ``mode="reverse"``: backpropagation through the unroll (``steps=1`` is APO's one-step
  lookahead). Memory grows with the number of steps kept; ``truncate=k`` backpropagates
  through the last ``k`` steps only (the first ``T - k`` are run and detached).
* ``mode="forward"``: forward-mode differentiation (MetaMD appendix A.6, Eq. 49 and 53;
  Franceschi et al. 2017) with ``torch.func.jvp``: tangents ``Z_t = d theta_t / d lambda``
  are carried along with ``theta_t``, so memory does not grow with ``T``, and the cost is
  proportional to the number of hyperparameter scalars ``n`` (one tangent per scalar,
  vectorised with ``torch.func.vmap`` when ``n > 1``). The first step of the window
  starts from ``Z = 0``, so its tangent is ``Z_1 = d step / d lambda`` at a fixed
  ``theta``; that one Jacobian-vector product goes by the double-vjp identity on a graph
  of what depends on ``lambda`` only (the step's own gradient in ``theta`` stays an
  ordinary one), every later step by ``torch.func.jvp`` (forward-over-reverse). The
  result is ``d_lambda outer + (d_theta outer)^T Z_T`` with ``d_theta outer`` from one
  reverse pass (Eq. 49), whatever ``n``. ``truncate=k`` starts the tangents at zero
  ``k`` steps before the end, matching reverse mode's truncation.

  Why not ``torch.func.jvp`` for the first step too (``bench/hypergrad_cost.py``, CPU):
  PyTorch's forward AD gives a tensor that is not dual a ``ZeroTensor`` tangent wherever
  it meets a dual one, and arithmetic on ``ZeroTensor`` materialises through Python meta
  kernels (~0.1-0.4 ms per op, torch 2.14), so with ``theta`` not dual each op that
  mixes ``lambda`` with ``theta`` or its gradient (``theta - exp(s) * g``: two per
  parameter tensor) costs far more than the op: a one-step hypergradient of the bench
  MLP cost 4.3 training steps that way, 2.9-3.0 this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from torch.func import jvp, vmap

from metaopt.hypergrad._common import Vec, as_leaves, hparam_inputs, positive_int, zeros_for_none
from metaopt.hypergrad.errors import FiniteGuard, check_finite
from metaopt.hypergrad.problem import apply_step

__all__ = ["forward_window", "reverse_window", "unrolled_grad"]

Step = Callable[[Vec, Vec], Sequence[Tensor]]
IndexedStep = Callable[[Vec, Vec, int], Sequence[Tensor]]
Objective = Callable[[Vec, Vec], Tensor]


def unrolled_grad(
    step: Step,
    outer_objective: Objective,
    params: Sequence[Tensor],
    hparams: Sequence[Tensor],
    *,
    steps: int,
    mode: str = "reverse",
    truncate: int | None = None,
) -> tuple[Tensor, ...]:
    """``d outer(theta_T, lambda) / d lambda`` with ``theta_{t+1} = step(theta_t, lambda)``.

    Args:
        step: ``step(params, hparams) -> params`` (tuples of tensors, same shapes). In
            reverse mode it must keep the graph (e.g. ``metaopt.func.loss_and_grads(...,
            create_graph=True)`` then :func:`metaopt.optim.update.preconditioned_step`);
            ``params`` it receives require grad. It may use the ``hparams`` given or, when
            the hparams passed in require grad, capture those same tensors (e.g. call
            ``preconditioner.apply`` with ``hparams = tuple(preconditioner.parameters())``;
            ``.grad`` is never written). In forward mode it must be pure: take gradients
            with ``torch.func.grad`` (not ``torch.autograd.grad``) and use the ``hparams``
            passed in. Its first call (per window) runs under ordinary autograd with
            ``hparams`` requiring grad and ``params`` not; later calls are transformed by
            ``torch.func.jvp`` with both dual. torch 2.x's ``mse_loss``
            forward-over-reverse formula fails there ("ZeroTensors are immutable") if its
            prediction is dual and its target not: add ``0 * hparam`` to both (see
            ``metaopt.learners.metamd.window``).
        outer_objective: ``outer(params, hparams) -> 0-dim tensor`` at ``theta_T``; in
            both modes differentiated by ``torch.autograd`` (one reverse pass).
        params: initial ``theta_0``; hparams: ``lambda`` (floating point tensors).
        steps: ``T >= 1``.
        mode: ``"reverse"`` or ``"forward"``.
        truncate: ``None`` (all steps) or ``k`` in ``[1, steps]``: differentiate through
            the last ``k`` steps only (``theta_{T-k}`` treated as a constant).

    Returns:
        one detached tensor per hparam (same shape, dtype, device); the total derivative,
        direct term ``d_lambda outer`` included.

    Raises:
        NonFiniteHypergradient: ``.term`` is ``"hypergradient"`` (reverse) or
            ``"tangent"`` / ``"hypergradient"`` (forward).
    """
    positive_int("steps", steps)
    if truncate is not None:
        positive_int("truncate", truncate)
        if truncate > steps:
            raise ValueError(f"truncate={truncate}: must be at most steps={steps}")
    if mode not in ("reverse", "forward"):
        raise ValueError(f"mode={mode!r}: allowed 'reverse', 'forward'")
    theta = as_leaves(params, "params")
    keep = steps if truncate is None else truncate

    def indexed(th: Vec, lam: Vec, i: int) -> Sequence[Tensor]:
        return step(th, lam)

    if mode == "reverse":
        lam = hparam_inputs(hparams)
        return reverse_window(indexed, outer_objective, theta, lam, steps, keep)[0]
    lam = as_leaves(hparams, "hparams")
    return forward_window(indexed, outer_objective, theta, lam, steps, keep, "mode='forward'")[0]


def reverse_window(
    step: IndexedStep, outer: Objective, theta: Vec, lam: Vec, steps: int, keep: int
) -> tuple[Vec, Vec, Tensor]:
    """Reverse mode through ``steps`` steps from ``theta`` (the last ``keep`` differentiated):
    ``(d outer / d lam, end state detached, outer at the end detached)``. ``lam`` are the
    tensors to differentiate with respect to (they require grad)."""
    theta = tuple(t.requires_grad_(True) for t in theta)
    for i in range(steps):
        with torch.enable_grad():
            theta = apply_step(step, theta, lam, i)
        if i < steps - keep:  # outside the differentiated window: cut the graph
            theta = tuple(p.detach().requires_grad_(True) for p in theta)
    with torch.enable_grad():
        value = outer(theta, lam)
        out = zeros_for_none(torch.autograd.grad(value, lam, allow_unused=True), lam)
    check_finite(out, "hypergradient")
    return out, tuple(t.detach() for t in theta), value.detach()


def forward_window(
    step: IndexedStep, outer: Objective, theta: Vec, lam: Vec, steps: int, keep: int, label: str
) -> tuple[Vec, Vec, Tensor]:
    """Forward mode through ``steps`` steps from ``theta`` (tangents over the last ``keep``):
    ``(d outer / d lam, end state, outer at the end)``, all detached. A step that is not
    pure for ``torch.func.jvp`` is a ``ValueError`` that starts with ``label``."""
    try:
        return _forward(step, outer, theta, lam, steps, keep)
    except RuntimeError as err:
        # what torch says when a step calls torch.autograd.grad inside the transform
        hints = ("functorch", "torch.func", "does not require grad")
        if not any(h in str(err) for h in hints):
            raise
        raise ValueError(
            f"{label}: the step and the objective must be pure for torch.func.jvp (take "
            "gradients with torch.func.grad, not torch.autograd.grad or requires_grad_); "
            f"torch said: {str(err).splitlines()[0]}"
        ) from err


def _basis(lam: Vec) -> tuple[int, Vec]:
    """``n`` and, per hparam, a ``(n, *shape)`` slice of the ``n x n`` identity."""
    sizes = [h.numel() for h in lam]
    n = sum(sizes)
    eye = torch.eye(n, device=lam[0].device, dtype=lam[0].dtype)
    cols = eye.split(sizes, dim=1)
    return n, tuple(c.to(h.dtype).reshape(n, *h.shape) for c, h in zip(cols, lam, strict=True))


def _forward(
    step: IndexedStep, outer: Objective, theta: Vec, lam: Vec, steps: int, keep: int
) -> tuple[Vec, Vec, Tensor]:
    n, basis = _basis(lam)
    first = steps - keep
    with torch.no_grad():  # the torch.func transforms still differentiate
        for i in range(first):
            theta = apply_step(step, theta, lam, i)

        def push(th: Vec, t_th: Vec, t_lam: Vec, i: int) -> tuple[Vec, Vec]:
            return jvp(lambda a, b: apply_step(step, a, b, i), (th, lam), (t_th, t_lam))

        theta, t_theta = _first_tangent(step, theta, lam, basis, n, first)
        if n == 1:  # one scalar: no vmap, a plain jvp per step
            t_lam = tuple(b[0] for b in basis)
            flat = tuple(t[0] for t in t_theta)
            for i in range(first + 1, steps):
                theta, flat = push(theta, flat, t_lam, i)
            t_theta = tuple(t.unsqueeze(0) for t in flat)
        else:
            for i in range(first + 1, steps):
                batched = vmap(partial(push, i=i), in_dims=(None, 0, 0), out_dims=(None, 0))
                theta, t_theta = batched(theta, t_theta, basis)
    derivs, value = _contract(outer, theta, t_theta, lam, n)
    sizes = [h.numel() for h in lam]
    out = tuple(
        d.reshape(h.shape).to(h.dtype) for d, h in zip(derivs.split(sizes), lam, strict=True)
    )
    guard = FiniteGuard()
    guard.add(t_theta, "tangent")
    guard.check(out)  # a non-finite result names "tangent" if that is, else "hypergradient"
    return out, tuple(t.detach() for t in theta), value


def _first_tangent(
    step: IndexedStep, theta: Vec, lam: Vec, basis: Vec, n: int, i: int
) -> tuple[Vec, Vec]:
    """``theta_1 = step(theta, lambda)`` and its tangents ``Z_1 = d theta_1 / d lambda``.

    The window starts from ``Z = 0``, so ``Z_1 = (d step / d lambda) e_i`` at a fixed
    ``theta``: a Jacobian-vector product in ``lambda`` alone. It goes by the double-vjp
    identity ``J e = d/du (J^T u) e`` on a graph that records only what depends on
    ``lambda`` (``theta`` does not require grad, so the step's own gradient in ``theta``
    is an ordinary one), not by ``torch.func.jvp``: with ``theta`` not dual, forward AD
    gives every tensor that meets ``lambda`` a ``ZeroTensor`` tangent, and on CPU those
    cost ~0.1-0.4 ms per op (torch 2.14), 2-3 training steps per hypergradient on the
    bench MLP, where this costs ~0.2. Returns tangents of shape ``(n, *param.shape)``.
    """
    lam_req = tuple(h.detach().requires_grad_(True) for h in lam)
    found: dict[int, Tensor] = {}
    with torch.enable_grad():
        out = apply_step(step, theta, lam_req, i)
        live = [i for i, o in enumerate(out) if o.requires_grad]
        dummy = tuple(torch.zeros_like(out[i]).requires_grad_(True) for i in live)
        pulled = torch.autograd.grad(
            [out[i] for i in live], lam_req, dummy, create_graph=True, allow_unused=True
        )  # J^T u, linear in u
        pairs = [(g, b) for g, b in zip(pulled, basis, strict=True) if g is not None]
        pairs = [(g, b if n > 1 else b[0]) for g, b in pairs if g.requires_grad]
        if pairs:
            z = torch.autograd.grad(
                [g for g, _ in pairs],
                dummy,
                [b for _, b in pairs],
                allow_unused=True,
                is_grads_batched=n > 1,
            )
            found = {
                i: t.reshape(n, *out[i].shape)
                for i, t in zip(live, z, strict=True)
                if t is not None
            }
    tangents = tuple(
        found[i] if i in found else out[i].new_zeros((n, *out[i].shape)) for i in range(len(out))
    )
    return tuple(o.detach() for o in out), tangents


def _contract(
    outer: Objective, theta: Vec, t_theta: Vec, lam: Vec, n: int
) -> tuple[Tensor, Tensor]:
    """``d_lambda outer + (d_theta outer)^T t_theta`` at ``theta_T`` (shape ``(n,)``) and
    ``outer`` there (detached).

    ``d_theta outer`` is one reverse pass whatever ``n`` (MetaMD Eq. 49, Franceschi et
    al.'s forward-mode hypergradient ``nabla E(s_T) Z_T``); it costs a forward and a
    backward, where a jvp of ``outer`` costs ``n`` forwards with tangents.
    """
    th = tuple(t.detach().requires_grad_(True) for t in theta)
    lm = tuple(h.detach().requires_grad_(True) for h in lam)
    with torch.enable_grad():
        value = outer(th, lm)
        grads = torch.autograd.grad(value, th + lm, allow_unused=True)
    grads = zeros_for_none(grads, th + lm)
    derivs = torch.cat([g.reshape(-1) for g in grads[len(th) :]])
    for g, t in zip(grads[: len(th)], t_theta, strict=True):
        derivs = derivs + (t.reshape(n, -1) @ g.reshape(-1)).to(derivs.dtype)
    return derivs, value.detach()
