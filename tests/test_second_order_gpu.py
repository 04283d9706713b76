"""KFAC, EKFAC and Shampoo run unchanged on CUDA: same trajectory as on the CPU (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.optim.registry import get_optimizer

pytestmark = pytest.mark.gpu
OPTIONS = {
    "kfac": {"factor_update_freq": 1, "inv_update_freq": 2, "kl_clip": None},
    "ekfac": {"factor_update_freq": 1, "inv_update_freq": 2, "kl_clip": None},
    "shampoo": {"precondition_freq": 2, "start_preconditioning_step": 1, "grafting": "adam"},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def _train(name: str, device: str, dtype: torch.dtype, steps: int) -> nn.Module:
    model = _model().to(device=device, dtype=dtype)
    opt = get_optimizer(name, model, **OPTIONS[name])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=gen).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cuda_matches_cpu_and_bf16_stays_finite(name: str) -> None:
    cpu = _train(name, "cpu", torch.float32, 6)
    gpu = _train(name, "cuda", torch.float32, 6)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4)
    bf16 = _train(name, "cuda", torch.bfloat16, 30)
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
