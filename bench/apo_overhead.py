"""APO's wall-clock overhead (Bae et al. 2022, section 4.5 and appendix J.2), printed as one
JSON object.

* APO-LR on SGDm at K=10 and K=100 relative to plain SGDm (``torch.optim.SGD``,
  momentum 0.9) on an MLP 784-1000-1000-10, batch 100 (targets: <= 1.2x and <= 1.03x);
* APO-Precond's time per step (K=10, after warm-up) relative to the ``ekfac`` and ``kfac``
  baselines (target: <= EKFAC's).

Like with like: every method amortises its periodic work over each chunk -- APO's meta
steps (K=10, the paper's default), the baselines' curvature statistics (every 10 steps) and
eigendecompositions (every 100 steps, their defaults; the paper does not state the
schedule of its K-FAC). APO-Precond runs without warm-up (``warmup=0``), so every step is
a preconditioned one, as in EKFAC.

Methods are timed in interleaved chunks of ``--chunk`` steps (a multiple of 100, so every
chunk holds the same number of meta steps and K-FAC inversions) over ``--reps`` rounds;
the report gives the median seconds per step and, as the other benches, the median over
rounds of the per-round ratios.

    OMP_NUM_THREADS=1 python bench/apo_overhead.py [--reps 5] [--chunk 100] [--device cpu]
        [--part all|lr|precond]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import metaopt
from metaopt.optim.kfac import EKFAC, KFAC
from tasks.models import get_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_trainer(model, opt):
    def step(batch, draw):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _apo_trainer(model, **options):
    apo = metaopt.APO(model, F.cross_entropy, **options)

    def step(batch, draw):
        return apo.step(batch, draw)["loss"]

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--part", choices=("all", "lr", "precond"), default="all", help="lr: K=10/100 only"
    )
    args = parser.parse_args(argv)
    if args.reps < 1 or args.chunk < 100 or args.chunk % 100:
        print("--reps must be >= 1 and --chunk a positive multiple of 100", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    pool_x = torch.randn(2000, 784, generator=g)
    # learnable labels (a random linear teacher), so that no method's lr runs away on noise
    pool_y = (pool_x @ torch.randn(784, 10, generator=g)).argmax(1).to(device)
    pool_x = pool_x.to(device)

    def stream():
        """Each method draws its own batch sequence (the same whatever ``--part`` runs)."""
        cursor = [0]

        def draw():
            i = cursor[0] % 20
            cursor[0] += 1
            return pool_x[i * 100 : (i + 1) * 100], pool_y[i * 100 : (i + 1) * 100]

        return draw

    def fresh():
        torch.manual_seed(0)
        return get_model("mlp", num_classes=10, in_features=784, widths=(1000, 1000)).to(device)

    models = {name: fresh() for name in ("sgdm", "apo-k10", "apo-k100", "precond", "ekfac", "kfac")}
    steps = {
        "sgdm": _torch_trainer(
            models["sgdm"], torch.optim.SGD(models["sgdm"].parameters(), lr=0.01, momentum=0.9)
        ),
        "apo-k10": _apo_trainer(models["apo-k10"], base="sgdm", lr=0.01, meta_interval=10),
        "apo-k100": _apo_trainer(models["apo-k100"], base="sgdm", lr=0.01, meta_interval=100),
        "precond": _apo_trainer(
            models["precond"], adapt="precond", lr=0.01, warmup=0, meta_interval=10
        ),
        "ekfac": _torch_trainer(models["ekfac"], EKFAC(models["ekfac"], lr=0.01)),
        "kfac": _torch_trainer(models["kfac"], KFAC(models["kfac"], lr=0.01)),
    }
    groups = {"lr": ("sgdm", "apo-k10", "apo-k100"), "precond": ("precond", "ekfac", "kfac")}
    keep = groups[args.part] if args.part != "all" else tuple(steps)
    steps = {k: v for k, v in steps.items() if k in keep}
    draws = {name: stream() for name in steps}
    for name, step in steps.items():  # warm-up: allocator, first eigendecompositions
        for _ in range(3):
            step(draws[name](), draws[name])
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            draw = draws[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.chunk):
                step(draw(), draw)
            _sync(device)
            times[name].append((time.perf_counter() - start) / args.chunk)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of the per-round ratio (machine drift hits both alike)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    out = {
        "bench": "apo_overhead",
        "device": str(device),
        "threads": args.threads,
        "reps": args.reps,
        "chunk": args.chunk,
        "part": args.part,
        "sec_per_step": med,
        "targets": {"k10": 1.2, "k100": 1.03, "precond_over_ekfac": 1.0},
    }
    if "sgdm" in med:
        out["apo_lr_k10_over_sgdm"] = ratio("apo-k10", "sgdm")
        out["apo_lr_k100_over_sgdm"] = ratio("apo-k100", "sgdm")
    if "precond" in med:
        out["apo_precond_over_ekfac"] = ratio("precond", "ekfac")
        out["apo_precond_over_kfac"] = ratio("precond", "kfac")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
