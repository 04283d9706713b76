"""APO on CUDA: plain (non-meta) steps make no host synchronisation (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from metaopt import APO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    "options",
    [
        dict(adapt="lr", base="sgdm"),
        dict(adapt="lr", base="adam", lr=1e-3),
        dict(adapt="layer-lr", base="rmsprop", lr=1e-3),
        dict(adapt="rmsprop-eps-rho", lr=1e-3),
        dict(adapt="precond", warmup=2, meta_lr=1e-3),
    ],
)
def test_plain_steps_do_not_sync_the_host(options):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(
        dev
    )
    x = torch.randn(32, 8, device=dev)
    y = torch.randint(0, 3, (32,), device=dev)
    apo = APO(model, F.cross_entropy, meta_interval=5, **options)
    apo.step((x, y), (x, y))  # step 0: the meta step (it may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # steps 1-4: plain steps
            stats = apo.step((x, y), (x, y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats["loss"]).item()
