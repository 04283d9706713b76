"""The engines unchanged on CUDA, float32 and float64: same answers as on CPU."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from metaopt.hypergrad import implicit_grad, unrolled_grad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _problem(device, dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    X, y = X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    lam = torch.full((5,), 0.7, device=device, dtype=dtype)
    K = X.T @ X / 40 + torch.diag(lam)
    w = torch.linalg.solve(K, X.T @ y / 40)

    def inner(p, h):
        return 0.5 * ((X @ p[0] - y) ** 2).mean() + 0.5 * (h[0] * p[0] ** 2).sum()

    def outer(p, h):
        return 0.5 * ((X @ p[0] - 1.0) ** 2).mean()

    def step(p, h):
        return (p[0] - h[0].exp() * grad(inner)(p, (lam,))[0],)

    return inner, outer, step, w, lam, K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engines_match_cpu(dtype):
    results = {}
    for device in ("cpu", "cuda"):
        inner, outer, step, w, lam, K = _problem(device, dtype)
        out = {}
        for name, opts in {
            "exact": {},
            "cg": {"iterations": 10},
            "neumann": {"iterations": 100, "alpha": 0.5},
            "closed_form": {"inverse_hvp": lambda v, K=K: (torch.linalg.solve(K, v[0]),)},
        }.items():
            out[name] = implicit_grad(inner, outer, (w,), (lam,), method=name, **opts)[0]
        log_lr = torch.tensor(-1.0, device=device, dtype=dtype)
        zero = torch.zeros_like(w)
        for name in ("reverse", "forward"):
            out[name] = unrolled_grad(step, outer, (zero,), (log_lr,), steps=5, mode=name)[0]
        for name, t in out.items():
            assert t.device.type == device and t.dtype == dtype, name
        results[device] = out
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, t in results["cuda"].items():
        ref = results["cpu"][name]
        assert float((t.cpu() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max())), name
