"""Per-step wall-clock of KFAC, EKFAC and Shampoo relative to SGD-momentum.

Each optimizer (built by name through ``metaopt.optim.get_optimizer`` at its defaults: KFAC
and EKFAC collect statistics every 10 steps and decompose every 100, Shampoo recomputes
roots every 20 from step 20) trains the MLP 784-1000-1000-10 and the small CNN of
``bench/kron_apply.py`` on a fixed batch of 128. A round runs ``--cycle`` consecutive
steps (default 100, so the amortised cost includes one full schedule cycle) of every
optimizer in turn; rounds are interleaved so machine load hits all alike. Reported per
optimizer: the amortised step time over a cycle and its median per-round ratio to
``sgdm``, and the median single step (a step with no statistics or decomposition).
The first ``--warmup`` steps (default 20: step 0's decompositions and Shampoo's graft-only
steps before its first roots) are not timed, so each timed cycle of 100 steps holds
exactly one KFAC/EKFAC decomposition, ten statistics steps and five Shampoo root updates.
Prints one JSON object as its last line.

    python bench/baselines_step.py [--rounds 3] [--cycle 100] [--warmup 20] [--threads 2]
                                   [--device cpu] [--arch both|mlp|cnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kron_apply import cnn, mlp, sync  # noqa: E402

from metaopt.optim import get_optimizer  # noqa: E402

NAMES = ["sgdm", "kfac", "ekfac", "shampoo"]


def run_cycle(model, opt, x, y, steps: int, device: torch.device) -> list[float]:
    """Per-step seconds of ``steps`` consecutive steps."""
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench(arch: str, rounds: int, cycle: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    build = mlp if arch == "mlp" else cnn
    x = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    runs = {}
    for name in NAMES:
        torch.manual_seed(0)
        model = build().to(device)
        runs[name] = (model, get_optimizer(name, model))
        run_cycle(*runs[name], x, y, warmup, device)
    amortised: dict[str, list[float]] = {n: [] for n in NAMES}
    singles: dict[str, list[float]] = {n: [] for n in NAMES}
    for r in range(rounds):
        print(f"{arch}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name in NAMES:
            times = run_cycle(*runs[name], x, y, cycle, device)
            amortised[name].append(sum(times) / len(times))
            singles[name].extend(times)
    out: dict[str, float] = {"sgdm_ms": 1e3 * statistics.median(amortised["sgdm"])}
    for name in NAMES[1:]:
        ratios = [t / s for t, s in zip(amortised[name], amortised["sgdm"], strict=True)]
        out[f"{name}_ms"] = 1e3 * statistics.median(amortised[name])
        out[f"{name}_vs_sgdm"] = statistics.median(ratios)
        out[f"{name}_median_step_vs_sgdm"] = statistics.median(singles[name]) / statistics.median(
            singles["sgdm"]
        )
    finite = all(torch.isfinite(p).all() for m, _ in runs.values() for p in m.parameters())
    out["all_finite"] = bool(finite)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycle", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=["both", "mlp", "cnn"], default="both")
    args = ap.parse_args()
    if args.rounds < 1 or args.cycle < 1 or args.warmup < 0:
        print(
            f"--rounds={args.rounds} --cycle={args.cycle} --warmup={args.warmup}: rounds and "
            "cycle must be >= 1, warmup >= 0",
            file=sys.stderr,
        )
        sys.exit(2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict = {
        "bench": "baselines_step",
        "device": str(device),
        "threads": args.threads,
        "batch": 128,
        "cycle": args.cycle,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    if args.arch in ("both", "mlp"):
        result["mlp_784_1000_1000_10"] = bench("mlp", args.rounds, args.cycle, args.warmup, device)
    if args.arch in ("both", "cnn"):
        result["small_cnn"] = bench("cnn", args.rounds, args.cycle, args.warmup, device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
