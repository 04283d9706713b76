"""Per-step time of learned optimizers relative to their base rule in ``torch.optim``.

``rank1-sgdm`` (a learned rank-1 Kronecker preconditioner on SGD-momentum) and ``ekfac-sgdm``
against ``torch.optim.SGD(momentum=0.9)``; ``rank1-adam`` (Adam on the preconditioned
gradient) and ``rank1-adam-direction`` (preconditioned Adam step, learned scale) against
``torch.optim.Adam``; ``rank1-adamw`` (the default ``kron-adamw`` recipe's optimizer)
against ``torch.optim.AdamW``. Each learned preconditioner has
random non-identity factors (the cost of a learned file, not of the identity). A step is
zero_grad + forward + backward + optimizer step on a fixed batch of 128. The optimizers are
timed in interleaved rounds (so machine load affects all alike) and the median of the
per-round ratios is reported. Prints one JSON object as its last line.

    python bench/kron_apply.py [--rounds 30] [--steps 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from metaopt.kron import KroneckerPreconditioner
from metaopt.optim import Preconditioned


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


#: name -> (family, family options, rule, compose, the torch.optim baseline it is timed against)
LEARNED = {
    "rank1-sgdm": ("rank1", {}, "sgdm", "gradient", "sgdm"),
    "ekfac-sgdm": ("ekfac-shaped", {}, "sgdm", "gradient", "sgdm"),
    "rank1-adam": ("rank1", {}, "adam", "gradient", "adam"),
    "rank1-adamw": ("rank1", {}, "adamw", "gradient", "adamw"),
    "rank1-adam-direction": ("rank1", {"learn_scale": True}, "adam", "direction", "adam"),
}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    family, options, rule, compose, _ = LEARNED[name]
    pre = KroneckerPreconditioner.for_model(model, family, **options)
    with torch.no_grad():  # a learned (non-identity) preconditioner
        for p in pre.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return Preconditioned(model.named_parameters(), pre, lr=1e-3, rule=rule, compose=compose)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, x, y, steps, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def bench(arch: str, rounds: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    build = mlp if arch == "mlp" else cnn
    x = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    names = ["sgdm", "adam", "adamw", *LEARNED]
    runs = {}
    for name in names:
        model = build().to(device)
        runs[name] = (model, make_optimizer(name, model))
        time_steps(*runs[name], x, y, 3, device)  # warm-up
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times[n].append(time_steps(*runs[n], x, y, steps, device))
    out = {f"{n}_ms": 1e3 * statistics.median(times[n]) for n in ("sgdm", "adam", "adamw")}
    for n, (*_, base) in LEARNED.items():
        ratios = [t / s for t, s in zip(times[n], times[base], strict=True)]
        out[f"{n}_ms"] = 1e3 * statistics.median(times[n])
        out[f"{n}_vs_{base}"] = statistics.median(ratios)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "bench": "kron_apply",
        "device": str(device),
        "threads": args.threads,
        "batch": 128,
        "mlp_784_1000_1000_10": bench("mlp", args.rounds, args.steps, device),
        "small_cnn": bench("cnn", args.rounds, args.steps, device),
        "target_learned_vs_base": 1.10,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
