"""APO's done-when experiments, run through the harness's training loop
(:func:`meta_test.runs.run_training`), each printing ONE JSON object as its last line.

Every configuration of a grid trains from the same seed for the same number of steps; the
best configuration of each method is the one with the lowest final loss on the full
training split (the papers select on final training loss, Bae et al. 2022, appendix C.3-C.4).

    OMP_NUM_THREADS=1 python experiments/apo_experiments.py rosenbrock
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py ill-conditioned
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-lr [--base sgdm|rmsprop]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-initial-lr [--base B]
        [--lambda-sgdm L] [--lambda-rmsprop L]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-eps-rho --rmsprop-lr LR
        [--fixed-lr]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py bf16-lenet
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py rmsprop-greedy-probe

(LR for digits-eps-rho: the best RMSprop lr of digits-lr; L: the best lambdas of digits-lr.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import torch

import tasks  # noqa: F401  (registers the tasks)
from meta_test.runs import run_training
from tasks.registry import get_task


def _run(task: Any, spec: str, hp: dict[str, Any], steps: int, seed: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    res = run_training(
        task,
        spec,
        hp,
        seed=seed,
        steps=steps,
        log_every=max(1, steps // 20),
        final_splits=("train",),
    )
    final = res.final.get("train_loss", math.nan)
    hp_log = {k: v[-1] for k, v in res.hparams_adapted.items() if v and "/" not in k}
    return {
        "spec": spec,
        "hparams": {k: v for k, v in hp.items() if not isinstance(v, dict)},
        "final_train_loss": None if not math.isfinite(final) else final,
        "diverged": res.diverged,
        "adapted_end": hp_log,
        "first_step_below_1e-10": next(
            (i for i, v in enumerate(res.train_loss) if v < 1e-10), None
        ),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if r["final_train_loss"] is not None]
    return min(ok, key=lambda r: r["final_train_loss"]) if ok else None


def _grid(task, spec, configs, steps, seed=0) -> dict[str, Any]:
    runs = [_run(task, spec, hp, steps, seed) for hp in configs]
    for r in runs:
        print(json.dumps(r), file=sys.stderr, flush=True)
    return {"best": _best(runs), "runs": runs}


def _seeded_grid(task, spec, configs, steps, seeds) -> dict[str, Any]:
    """:func:`_grid` over several seeds: each configuration scores the median of its final
    losses (a diverged seed counts as +inf) and the best configuration is the lowest median."""
    runs = []
    for hp in configs:
        per_seed = [_run(task, spec, hp, steps, s) for s in seeds]
        finals = [r["final_train_loss"] for r in per_seed]
        median = statistics.median(math.inf if f is None else f for f in finals)
        row = {
            "spec": spec,
            "hparams": per_seed[0]["hparams"],
            "final_train_loss": median if math.isfinite(median) else None,
            "final_train_loss_per_seed": dict(zip(map(str, seeds), finals, strict=True)),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        runs.append(row)
    return {"best": _best(runs), "seeds": list(seeds), "runs": runs}


def rosenbrock() -> dict[str, Any]:
    task = get_task("rosenbrock", dtype=torch.float64)
    steps = 20_000
    lrs = (2e-3, 1.5e-3, 1.2e-3, 1e-3, 7e-4, 5e-4, 3e-4, 1e-4)
    sgd = _grid(task, "sgd", [{"lr": lr} for lr in lrs], steps)
    common = dict(
        lambda_fsd=0.0,
        lambda_wsd=0.0,
        meta_lr=1e-2,
        warmup=0,
        precond_options={"dense_diag_max": 4},
    )
    apo = _grid(task, "apo-precond", [dict(common, lr=lr) for lr in (3e-3, 2e-3, 1e-3)], steps)
    best_sgd = sgd["best"]["final_train_loss"]
    best_apo = apo["best"]["final_train_loss"] if apo["best"] else math.inf
    return {
        "experiment": "rosenbrock",
        "steps": steps,
        "sgd": sgd,
        "apo_precond": apo,
        "claim_apo_below_1e-10": best_apo < 1e-10,
        "claim_sgd_above_1e-10": best_sgd >= 1e-10,
    }


def ill_conditioned(seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Each method tuned by grid on the median final loss over ``seeds`` (initialisation and
    batch order): K-FAC's final loss jumps by orders of magnitude between neighbouring
    configurations and seeds, so one seed's best K-FAC run is a draw, not a tuned value."""
    task = get_task("ill-conditioned-regression")
    steps = 3000
    sgdm_lrs = (0.3, 0.1, 0.03, 0.01, 0.003)
    sgdm = _seeded_grid(task, "sgdm", [{"lr": lr} for lr in sgdm_lrs], steps, seeds)
    kfac = _seeded_grid(
        task,
        "kfac",
        [
            {"lr": lr, "damping": d, "momentum": m}
            for m in (0.9, 0.0)
            for lr in (0.3, 0.1, 0.03, 0.01)
            for d in (1e-2, 1e-3, 1e-4)
        ],
        steps,
        seeds,
    )
    common = {"lr": 0.1, "precond_momentum": 0.9, "warmup": 0, "meta_lr": 1e-2}
    apo = _seeded_grid(
        task,
        "apo-precond",
        [dict(common, lambda_fsd=f, lambda_wsd=w) for f in (0.3, 0.1, 0.03) for w in (0.01, 0.001)],
        steps,
        seeds,
    )
    f = {
        k: v["best"]["final_train_loss"] for k, v in (("sgdm", sgdm), ("kfac", kfac), ("apo", apo))
    }
    return {
        "experiment": "ill-conditioned-regression",
        "steps": steps,
        "selection": f"median final train loss over seeds {list(seeds)}",
        "sgdm": sgdm,
        "kfac": kfac,
        "apo_precond": apo,
        "claim_apo_le_kfac": f["apo"] <= f["kfac"],
        "claim_apo_le_1e-2_sgdm": f["apo"] <= 1e-2 * f["sgdm"],
    }


DIGITS = dict(model="mlp", model_options={"in_features": 64, "widths": (256, 256)}, batch_size=100)
# Bae et al. 2022, earlier version, section 5.2 (the MNIST MLP behind Fig. 4 right): fixed-lr
# grids and APO's lambda grids; APO starts from lr 0.1 (SGDm) / 3e-4 (RMSprop) with meta-RMSprop
# at 0.1 (Bae et al. 2022, appendix C.2), lambda_wsd 0
PAPER_FIXED = {"sgdm": (0.1, 0.01, 0.001), "rmsprop": (0.01, 0.001, 1e-4)}
EXTRA_FIXED = {"sgdm": (1.0, 0.3, 0.03), "rmsprop": (3e-3, 3e-4)}  # a finer grid, reported too
PAPER_LAMBDAS = {"sgdm": (0.1, 0.01, 1e-3), "rmsprop": (0.1, 0.01, 1e-3, 1e-4, 1e-5, 0.0)}


def digits_lr(bases: tuple[str, ...] = ("sgdm", "rmsprop")) -> dict[str, Any]:
    task = get_task("digits", **DIGITS)
    steps = 2000
    out: dict[str, Any] = {
        "experiment": "digits-lr",
        "steps": steps,
        "model": "mlp 64-256-256-10",
        "protocol": "Bae et al. 2022 earlier version, section 5.2 grids; APO lr0 0.1 (sgdm) / "
        "3e-4 (rmsprop), meta RMSprop 0.1",
    }
    for base in bases:
        fixed = _grid(
            task, base, [{"lr": lr} for lr in PAPER_FIXED[base] + EXTRA_FIXED[base]], steps
        )
        paper_best = _best([r for r in fixed["runs"] if r["hparams"]["lr"] in PAPER_FIXED[base]])
        apo = _grid(
            task, f"apo-lr:{base}", [{"lambda_fsd": lam} for lam in PAPER_LAMBDAS[base]], steps
        )
        out[base] = dict(fixed, best_paper_grid=paper_best)
        out[f"{base}_apo"] = apo
        a = apo["best"]["final_train_loss"]
        out[f"claim_{base}_apo_below_fixed_paper_grid"] = a < paper_best["final_train_loss"]
        out[f"claim_{base}_apo_below_fixed_finer_grid"] = a < fixed["best"]["final_train_loss"]
    return out


def digits_initial_lr(lambdas: dict[str, float]) -> dict[str, Any]:
    """APO from initial lrs 1e-7 .. 1e-1 (Bae et al. 2022, appendix J.2) at each base's best
    lambda of digits-lr."""
    task = get_task("digits", **DIGITS)
    steps = 2000
    out: dict[str, Any] = {"experiment": "digits-initial-lr", "steps": steps}
    for base, lam in lambdas.items():
        runs = [
            _run(task, f"apo-lr:{base}", {"lr": lr, "lambda_fsd": lam}, steps)
            for lr in (1e-7, 1e-5, 1e-3, 1e-1)
        ]
        for r in runs:
            print(json.dumps(r), file=sys.stderr, flush=True)
        finals = [r["final_train_loss"] for r in runs]
        ok = [v for v in finals if v is not None]
        ratio = max(ok) / min(ok) if len(ok) == len(finals) else math.inf
        lrs = [r["adapted_end"].get("lr") for r in runs]
        lr_ratio = max(lrs) / min(lrs) if all(lrs) and len(ok) == len(finals) else math.inf
        out[base] = {
            "lambda_fsd": lam,
            "runs": runs,
            "max_over_min": ratio,  # of the final training losses
            "claim_within_factor_2": ratio <= 2.0,
            "lr_max_over_min": lr_ratio,  # of the adapted lrs the runs end at
            "claim_lrs_within_factor_2": lr_ratio <= 2.0,
        }
    return out


def digits_eps_rho(rmsprop_lr: float = 1e-2, fixed_lr: bool = False) -> dict[str, Any]:
    """RMSprop at its best fixed lr (from ``digits-lr``, same seed and steps) against APO
    adapting eps and rho (and lr) from that lr, with Bae et al. 2022's appendix D.7 protocol:
    meta-RMSprop at 0.01, lambda_fsd in {1e-3, 1e-4, 1e-5} x lambda_wsd in {1e-1, ..., 1e-6}."""
    task = get_task("digits", **DIGITS)
    steps = 2000
    fixed = _run(task, "rmsprop", {"lr": rmsprop_lr}, steps)
    apo = _grid(
        task,
        "apo-rmsprop-eps-rho",
        [
            {"lr": rmsprop_lr, "lambda_fsd": f, "lambda_wsd": w, "fixed_lr": fixed_lr}
            for f in (1e-3, 1e-4, 1e-5)
            for w in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
        ],
        steps,
    )
    return {
        "experiment": "digits-eps-rho",
        "steps": steps,
        "protocol": "Bae et al. 2022 appendix D.7: meta RMSprop lr 0.01, lambda grids as in the "
        "paper",
        "fixed_lr": fixed_lr,
        "rmsprop": fixed,
        "apo_rmsprop_eps_rho": apo,
        "claim_below_default_rmsprop": apo["best"]["final_train_loss"] < fixed["final_train_loss"],
    }


def bf16_lenet() -> dict[str, Any]:
    """LeNet on the digits with the model in bf16: APO-Precond (fp32 preconditioner), SGDm,
    and K-FAC (fp32 factors) at three dampings; K-FAC also in fp32 for reference."""
    steps = 1500
    out: dict[str, Any] = {"experiment": "bf16-lenet", "steps": steps}
    for dtype in ("bfloat16", "float32"):
        task = get_task(
            "digits",
            model="lenet",
            model_options={"input_size": 8},
            dtype=getattr(torch, dtype),
            batch_size=100,
        )
        runs = {
            "kfac": [
                _run(task, "kfac", {"lr": 0.05, "damping": d}, steps)
                for d in ((1e-3, 1e-2, 1e-1) if dtype == "bfloat16" else (1e-3,))
            ]
        }
        if dtype == "bfloat16":
            runs["apo_precond"] = _run(
                task,
                "apo-precond",
                {
                    "lr": 0.05,
                    "lambda_fsd": 0.1,
                    "lambda_wsd": 0.1,
                    "warmup": 300,
                    "meta_lr": 1e-4,
                    "precond_momentum": 0.9,
                },
                steps,
            )
            runs["sgdm"] = _run(task, "sgdm", {"lr": 0.05}, steps)
        out[dtype] = runs
        print(json.dumps(runs), file=sys.stderr, flush=True)
    return out


PROBE_STEPS = (0, 10, 50, 200, 500, 1000, 1500, 2000)
PROBE_ETAS = tuple(10 ** (e / 4) for e in range(-24, 1))  # 1e-6 .. 1, four per decade


def _greedy_eta(model, loss_fn, batch, square_avg, alpha=0.99, eps=1e-8) -> dict[str, float]:
    """The lr minimising ``J_B(theta - eta g / (sqrt(v') + eps))`` over ``PROBE_ETAS``, with
    ``v' = alpha v + (1 - alpha) g^2`` the RMSprop step this batch would take: the objective
    APO's meta-gradient descends at ``lambda = 0`` (its one-step lookahead on B)."""
    x, y = batch
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    dirs = []
    for p, g in zip(params, grads, strict=True):
        v = square_avg(p)
        v = (1 - alpha) * g * g if v is None else alpha * v + (1 - alpha) * g * g
        dirs.append(g / (v.sqrt() + eps))
    values = []
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for eta in PROBE_ETAS:
            for p, s, d in zip(params, saved, dirs, strict=True):
                p.copy_(s - eta * d)
            values.append(float(loss_fn(model(x), y)))
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    best = min(range(len(values)), key=values.__getitem__)
    return {"greedy_lr": PROBE_ETAS[best], "loss_after_greedy_step": values[best]}


def rmsprop_greedy_probe(steps: int = 2000) -> dict[str, Any]:
    """Why RMSprop-APO stays at a small lr on the digits (diagnosis of the digits-lr row).

    Along two trajectories -- RMSprop at its best fixed lr 0.01, and RMSprop-APO at
    lambda = 0 (digits-lr's best) from lr 3e-4 -- the one-step-optimal lr on the current
    batch (``_greedy_eta``) at the steps of ``PROBE_STEPS``, next to the lr in use.
    """
    from meta_test.runs import EXTRA_STREAM_OFFSET
    from meta_test.specs import build_trainer

    task = get_task("digits", **DIGITS)
    out: dict[str, Any] = {"experiment": "rmsprop-greedy-probe", "steps": steps}
    for spec, hp in (("rmsprop", {"lr": 0.01}), ("apo-lr:rmsprop", {"lambda_fsd": 0.0})):
        model = task.make_model(0)
        model.train()
        trainer = build_trainer(spec, model, task, hp)
        names = {id(p): n for n, p in model.named_parameters()}

        def square_avg(p, trainer=trainer, names=names):
            if hasattr(trainer, "apo"):  # APO's base state, keyed by parameter name
                return trainer.apo.state.get(f"{names[id(p)]}:square_avg")
            return trainer.optimizer.state.get(p, {}).get("square_avg")

        batches = task.train_batches(0)
        extra = task.train_batches(EXTRA_STREAM_OFFSET)
        rows = []
        for step in range(steps + 1):
            batch = next(batches)
            if step in PROBE_STEPS:
                lr = trainer.hparam_log().get("lr", hp.get("lr"))
                row = {"step": step, "lr_in_use": lr}
                row.update(_greedy_eta(model, task.loss, batch, square_avg))
                rows.append(row)
                print(json.dumps({spec: row}), file=sys.stderr, flush=True)
            if step < steps:
                trainer.step(batch, lambda extra=extra: next(extra))
        out[spec] = rows
    return out


EXPERIMENTS = {
    "rosenbrock": rosenbrock,
    "ill-conditioned": ill_conditioned,
    "digits-lr": digits_lr,
    "digits-initial-lr": digits_initial_lr,
    "digits-eps-rho": digits_eps_rho,
    "bf16-lenet": bf16_lenet,
    "rmsprop-greedy-probe": rmsprop_greedy_probe,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="APO done-when experiments")
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--rmsprop-lr", type=float, default=1e-2, help="digits-eps-rho only")
    parser.add_argument(
        "--fixed-lr", action="store_true", help="digits-eps-rho: adapt eps and rho only (D.7)"
    )
    parser.add_argument("--base", choices=("sgdm", "rmsprop"), help="digits-lr/-initial-lr: one")
    parser.add_argument("--lambda-sgdm", type=float, default=0.1, help="digits-initial-lr")
    parser.add_argument("--lambda-rmsprop", type=float, default=0.0, help="digits-initial-lr")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bases = (args.base,) if args.base else ("sgdm", "rmsprop")
    if args.experiment == "digits-eps-rho":
        print(json.dumps(digits_eps_rho(args.rmsprop_lr, args.fixed_lr)))
    elif args.experiment == "digits-lr":
        print(json.dumps(digits_lr(bases)))
    elif args.experiment == "digits-initial-lr":
        lams = {"sgdm": args.lambda_sgdm, "rmsprop": args.lambda_rmsprop}
        print(json.dumps(digits_initial_lr({b: lams[b] for b in bases})))
    else:
        print(json.dumps(EXPERIMENTS[args.experiment]()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
