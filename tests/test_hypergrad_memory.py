"""Repeated hypergradients leave memory flat: no graph or reference survives a call.

Two counters, both exact (no RSS noise):

* the step and the outer objective route a value through ``GraphProbe``, an identity
  ``autograd.Function`` whose graph node keeps a token tracked by a ``WeakSet``; a token
  lives exactly as long as its node, so the number alive after a call is the number of
  graphs (steps and outer evaluations) something still keeps alive;
* the number of live ``torch.Tensor`` Python objects (``gc``), for leaked caches.

Each test runs a control that deliberately keeps a reference, to show the counters see it.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from metaopt.func import functional_forward, loss_and_grads
from metaopt.hypergrad import implicit_grad, unrolled_grad

loss_fn = nn.functional.cross_entropy


class _Token:
    """A plain object (no tensor) a probe node keeps; it lives as long as that node."""


class GraphProbe(torch.autograd.Function):
    """Identity whose graph node holds a tracked token: live tokens = live graphs."""

    alive: weakref.WeakSet[_Token] = weakref.WeakSet()

    @staticmethod
    def forward(ctx, x):
        ctx.token = _Token()
        GraphProbe.alive.add(ctx.token)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on lazy modules' deprecated attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("leak", [False, True])
def test_200_one_step_hypergradients_leave_memory_flat(leak):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    forward = functional_forward(model)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    log_lr = torch.tensor(0.1).log()
    kept = []  # what a leaking caller keeps alive

    def step(theta, h):
        p = dict(zip(names, theta, strict=True))
        p = {n: GraphProbe.apply(t) for n, t in p.items()}
        loss, grads = loss_and_grads(forward, loss_fn, p, batch, create_graph=True)
        if leak:
            kept.append(loss)  # a loss with its graph: the leak the test must catch
        return tuple(p[n] - h[0].exp() * grads[n] for n in names)

    def outer(theta, h):
        return GraphProbe.apply(
            loss_fn(forward(dict(zip(names, theta, strict=True)), val[0]), val[1])
        )

    graphs, tensors = [], []
    for i in range(200):
        g = torch.Generator().manual_seed(i)
        batch = (torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
        val = (torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
        (hg,) = unrolled_grad(step, outer, params, (log_lr,), steps=1)
        graphs.append(len(GraphProbe.alive))  # graphs alive right after the call
        # the caller moves on as a learner would: new hparams and params, detached
        log_lr = (log_lr - 0.01 * hg).detach()
        theta = tuple(t.requires_grad_(True) for t in params)
        params = tuple(t.detach() for t in step(theta, (log_lr,)))
        if i in (19, 99, 199):
            tensors.append(_live_tensors())
    if leak:
        assert graphs[-1] > graphs[19] > 0 and tensors[-1] > tensors[0], (graphs[-1], tensors)
    else:
        assert max(graphs) == 0, max(graphs)
        assert max(tensors) == min(tensors), tensors


@pytest.mark.parametrize("leak", [False, True])
def test_repeated_implicit_hypergradients_keep_no_tensors(leak):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    kept = []

    def inner(p, h):
        return 0.5 * ((X @ p[0] - y) ** 2).mean() + 0.5 * (h[0].exp() * p[0] ** 2).sum()

    def outer(p, h):
        return 0.5 * ((X @ p[0] - 1.0) ** 2).mean()

    w, lam = torch.zeros(6), torch.zeros(6)
    counts = []
    for i in range(40):
        hg = implicit_grad(inner, outer, (w,), (lam,), method="neumann", alpha=0.3)
        if leak:
            kept.append(hg)
        lam = lam - 0.01 * hg[0]
        if i in (9, 19, 39):
            counts.append(_live_tensors())
    if leak:
        assert counts[-1] > counts[0], counts
    else:
        assert max(counts) == min(counts), counts
