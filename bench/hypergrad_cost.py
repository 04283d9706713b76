"""Cost of one hypergradient in units of one ordinary training step.

MLP 784-256-256-10, batch 128, cross-entropy. One training step = ``zero_grad`` + forward
+ backward + ``torch.optim.SGD`` step. Engines (each computes one hypergradient):

* ``unroll``: one-step lookahead, reverse mode, w.r.t. a scalar log learning rate (APO's
  shape); ``unroll_lowrank``: the same w.r.t. rank-1 lowrank preconditioner meta-parameters.
* ``forward``: the same one-step lookahead in forward mode (one scalar hparam).
* ``neumann`` / ``cg`` (J = 20): implicit hypergradient of the validation loss w.r.t. a log
  weight decay, inner objective = training loss + weight decay on the same batch.
* ``outer_grad_only``: just ``d_theta outer`` (forward + backward, no update): the floor
  under every implicit engine; ``closed_form`` minus it is the mixed product's cost.
* ``closed_form``: MetaMD's lowrank Bregman potential ``inner = <g, theta> +
  B_M(theta, theta_1)`` with ``B_M = 1/2 (theta - theta_1)^T M (theta - theta_1)``, whose
  Hessian in ``theta`` is ``M``, so ``H^{-1} v = M^{-1} v`` is one
  ``KroneckerPreconditioner.apply`` of the "lowrank" family; hparams = its U, V. The
  mixed product goes by double backward through ``inner``; ``closed_form_inner_grad``
  gives ``d_theta inner = g + M (theta - theta_1)`` in closed form (``inner_grad=``), so
  the mixed product is a single backward through it. ``closed_form_mixed`` gives the
  mixed product analytically too (``mixed_product=KroneckerPreconditioner.bregman_mixed``:
  thin matrix products per layer), so no autograd graph of ``d_theta inner`` is built;
  ``closed_form_inverse_mixed`` gives the whole term ``(d^2 B_M / d phi d theta)^T M^{-1} v``
  in one call (``inverse_mixed=KroneckerPreconditioner.bregman_inverse_mixed``: ``M^{-1} v``
  is never formed, six passes over each layer's matrices instead of nine).

Each engine and the training step are timed in interleaved rounds (machine load hits both
alike); the figure is the median over rounds of (engine time / training-step time).
Prints one JSON object as its last line.

    python bench/hypergrad_cost.py [--rounds 15] [--reps 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from metaopt.func import functional_forward, loss_and_grads
from metaopt.hypergrad import implicit_grad, unrolled_grad
from metaopt.kron import KroneckerPreconditioner

loss_fn = nn.functional.cross_entropy
TARGETS = {
    "unroll": 3.0,
    "forward": 3.0,
    "closed_form": 1.5,
    "closed_form_inner_grad": 1.5,
    "closed_form_mixed": 1.5,
    "closed_form_inverse_mixed": 1.5,
}


def build(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).to(device=device, dtype=dtype)
    x = torch.randn(128, 784, device=device, dtype=dtype)
    y = torch.randint(0, 10, (128,), device=device)
    xv = torch.randn(128, 784, device=device, dtype=dtype)
    yv = torch.randint(0, 10, (128,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = functional_forward(model)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    log_lr = torch.tensor(0.01, device=device, dtype=dtype).log()

    def as_dict(theta):
        return dict(zip(names, theta, strict=True))

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def outer(theta, h):
        return loss_fn(forward(as_dict(theta), xv), yv)

    def step(theta, h):  # reverse mode: autograd with create_graph
        p = as_dict(theta)
        _, g = loss_and_grads(forward, loss_fn, p, (x, y), create_graph=True)
        return tuple(p[n] - h[0].exp() * g[n] for n in names)

    def pure_step(theta, h):  # forward mode: torch.func.grad
        p = as_dict(theta)
        g = torch.func.grad(lambda q: loss_fn(forward(q, x), y))(p)
        return tuple(p[n] - h[0].exp() * g[n] for n in names)

    # lowrank preconditioner (rank 1): the one-step unroll w.r.t. U, V and MetaMD's Bregman.
    # The engines accept hparams that are the module's own parameters, captured by the
    # closures, so no functional re-parameterisation of the preconditioner is needed.
    pre = KroneckerPreconditioner.for_model(model, "lowrank", rank=1, init_scale=0.5)
    pre = pre.to(device=device, dtype=dtype)
    meta = tuple(pre.parameters())

    def lowrank_step(theta, h):
        p = as_dict(theta)
        _, g = loss_and_grads(forward, loss_fn, p, (x, y), create_graph=True)
        d = pre.apply(g)
        return tuple(p[n] - 0.01 * d[n] for n in names)

    # implicit: training loss + exp(s)/2 |theta|^2 as the inner objective
    log_wd = torch.tensor(1e-4, device=device, dtype=dtype).log()

    def inner_wd(theta, h):
        reg = sum((t * t).sum() for t in theta)
        return loss_fn(forward(as_dict(theta), x), y) + 0.5 * h[0].exp() * reg

    # closed form: inner = <g, theta> + B_M(theta, theta_1); theta* = theta_1 - M^{-1} g
    _, g1 = loss_and_grads(
        forward, loss_fn, {n: p.requires_grad_(True) for n, p in as_dict(params).items()}, (x, y)
    )
    params = tuple(p.detach() for p in params)
    ref = as_dict(params)
    with torch.no_grad():
        direction = pre.apply(g1)
    theta_star = tuple(ref[n] - direction[n] for n in names)
    g1t = tuple(g1[n] for n in names)

    def inner_bregman(theta, h):
        linear = sum((a * b).sum() for a, b in zip(g1t, theta, strict=True))
        return linear + pre.bregman(as_dict(theta), ref)

    def inner_bregman_grad(theta, h):  # g + M (theta - theta_1), M block by block
        delta = {n: t - ref[n] for n, t in zip(names, theta, strict=True)}
        m_delta = pre.metric_apply(delta)
        return tuple(a + m_delta[n] for a, n in zip(g1t, names, strict=True))

    def inverse_hvp(v):
        # M^{-1} v through Woodbury, O(r out in) per layer; U, V are constants here
        out = pre.apply(as_dict(v), meta_constant=True)
        return tuple(out[n] for n in names)

    def mixed_product(u, theta, h):  # (d^2 B_M / d phi d theta)^T u, analytically
        return pre.bregman_mixed(as_dict(u), as_dict(theta), ref)

    def inverse_mixed(v, theta, h):  # (d^2 B_M / d phi d theta)^T M^{-1} v, fused
        return pre.bregman_inverse_mixed(as_dict(v), as_dict(theta), ref)

    def outer_grad_only():  # d_theta outer alone: the floor under every implicit engine
        theta = tuple(t.detach().requires_grad_(True) for t in theta_star)
        return torch.autograd.grad(outer(theta, ()), theta)

    return {
        "train_step": train_step,
        "outer_grad_only": outer_grad_only,
        "unroll": lambda: unrolled_grad(step, outer, params, (log_lr,), steps=1),
        "unroll_lowrank": lambda: unrolled_grad(lowrank_step, outer, params, meta, steps=1),
        "forward": lambda: unrolled_grad(
            pure_step, outer, params, (log_lr,), steps=1, mode="forward"
        ),
        "neumann": lambda: implicit_grad(
            inner_wd, outer, params, (log_wd,), method="neumann", iterations=20, alpha=0.1
        ),
        "cg": lambda: implicit_grad(
            inner_wd, outer, params, (log_wd,), method="cg", iterations=20, tol=None
        ),
        "closed_form": lambda: implicit_grad(
            inner_bregman, outer, theta_star, meta, method="closed_form", inverse_hvp=inverse_hvp
        ),
        "closed_form_inner_grad": lambda: implicit_grad(
            None,
            outer,
            theta_star,
            meta,
            method="closed_form",
            inverse_hvp=inverse_hvp,
            inner_grad=inner_bregman_grad,
        ),
        "closed_form_mixed": lambda: implicit_grad(
            None,
            outer,
            theta_star,
            meta,
            method="closed_form",
            inverse_hvp=inverse_hvp,
            mixed_product=mixed_product,
        ),
        "closed_form_inverse_mixed": lambda: implicit_grad(
            None, outer, theta_star, meta, method="closed_form", inverse_mixed=inverse_mixed
        ),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fns = build(device, getattr(torch, args.dtype))
    for fn in fns.values():  # warm-up (first-call tracing, allocator)
        timed(fn, 2, device)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, args.reps, device))
    base = times["train_step"]
    cost = {
        n: statistics.median(t / b for t, b in zip(times[n], base, strict=True))
        for n in fns
        if n != "train_step"
    }
    result = {
        "bench": "hypergrad_cost",
        "device": str(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "model": "mlp-784-256-256-10",
        "batch": 128,
        "train_step_ms": 1e3 * statistics.median(base),
        "cost_in_train_steps": {n: round(c, 3) for n, c in cost.items()},
        "targets": TARGETS,
        "meets_targets": {n: cost[n] <= t for n, t in TARGETS.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
