"""MetaMD's done-when experiments: meta-train, save, and compare through the harness.

    OMP_NUM_THREADS=1 python experiments/metamd_claims.py quadratics --variant mild --out DIR
    OMP_NUM_THREADS=1 python experiments/metamd_claims.py linreg --out DIR
    OMP_NUM_THREADS=1 python experiments/metamd_claims.py digits --holdout 0 --out DIR
    OMP_NUM_THREADS=1 python experiments/metamd_claims.py agreement

Each learner is meta-trained on training tasks only, saved with ``save_learned_optimizer``
and deployed on a held-out task as ``learned:<path>`` beside tuned baselines by
``meta_test.run_comparison`` (grid search over lr x weight decay for every spec;
``--tune-steps`` is its ``search_steps``, ``--tune-on iterations`` its
``select_on="steps-to-target"``; the ``momentum`` experiment deploys the files as
``learned:<path>?momentum=0.9``). Prints
one JSON object (the summary) as its last line; ``--out`` keeps the harness's
``results.json`` / ``report.md`` / plots and the learned-optimizer files.

MetaMD here is the ``"metamd-paper"`` preset (Eq. 8, Neumann, mirror descent); MetaSGD and
Meta-Curvature learn from the training loss at the end of truncated windows of
``--truncate`` inner steps (a meta-step advances every run by one window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import metaopt
from metaopt.learners import MetaCurvature, MetaMD, MetaSGD

LOG_GRID = tuple(float(f"{10 ** (e / 4):.3g}") for e in range(-16, 1))  # 1e-4 .. 1
PAPER = {"preset": "metamd-paper"}
#: the competitors' recipe: the task's training loss at the end of a window, from P = I
COMPETITOR = {"meta_objective": "final-loss", "preconditioner_options": {"init_scale": 0.0}}


def _train(name: str, learner: Any, outer_steps: int, path: Path) -> dict[str, Any]:
    start = time.perf_counter()
    learned = learner.meta_train(outer_steps)
    hist = learner.history
    metaopt.save_learned_optimizer(learned, path, metadata={"learner": name})
    return {
        "outer_steps": outer_steps,
        "seconds": round(time.perf_counter() - start, 1),
        "meta_objective_first": hist[0].meta_objective,
        "meta_objective_last": hist[-1].meta_objective,
        "skipped_tasks": sum(h.skipped for h in hist),
    }


def _compare(
    task: Any,
    specs: dict[str, str],
    out: Path,
    tune_steps: int | None = None,
    tune_on: str = "loss",
    **kw: Any,
) -> dict[str, Any]:
    """``meta_test.run_comparison`` of ``specs`` on ``task`` (grid search, 3 seeds), written
    to ``out``; returns the summary per label. ``tune_steps`` is the search runs' horizon
    (``search_steps``; default the reported ``steps``). ``tune_on="loss"`` picks by the loss
    at the end of the search runs (``select_on`` as given); ``tune_on="iterations"`` by the
    fewest steps to ``target_loss`` (``select_on="steps-to-target"``; a point that never
    reaches it ranks by its final loss), the quantity the quadratics report: on a synthetic
    problem every stable lr reaches ``f*`` within the budget, so the final loss would pick
    among them by rounding noise."""
    from meta_test import run_comparison

    if tune_on not in ("loss", "iterations"):
        raise ValueError(f"tune_on={tune_on!r}: must be 'loss' or 'iterations'")
    if tune_on == "iterations":
        kw["select_on"] = "steps-to-target"
    kw = {"seeds": (0, 1, 2), "hpo": "grid", **kw}  # every experiment here: 3 seeds, grid
    res = run_comparison(
        task, list(specs.values()), out=out, overwrite=True, search_steps=tune_steps, **kw
    )
    summary = {}
    for label, spec in specs.items():
        r = res["optimizers"][spec]
        summary[label] = {
            "hparams": r["hparams"],
            "steps_to_target": r["steps_to_target"],
            "auc_train_loss": r["auc_train_loss"]["mean"],
            "final_train_loss": r["final_train_loss"]["mean"],
            "test_metric": r["test_metric"]["mean"],
            "sec_per_iter": r["sec_per_iter"]["mean"],
        }
    return summary


# --- meta-quadratics -----------------------------------------------------------------------
def quadratics(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import get_family

    family = get_family("meta-quadratics", variant=args.variant, dtype=torch.float64)
    out = Path(args.out)
    common = dict(
        PAPER,
        engine="forward",
        inner_steps=args.inner_steps,
        tasks_per_step=4,
        lr=args.inner_lr,
        meta_lr=0.05,
        seed=args.seed,
    )
    learners = {
        # the paper's objective (Eq. 8) with the paper's engine for the diagonal case (A.6)
        "metamd": MetaMD(family, **common, objective_options={"k_lambda": args.k_lambda}),
        # the same learner with the task loss at theta_T as meta-objective
        "metamd-final-loss": MetaMD(family, **common, meta_objective="final-loss"),
        # ... and with log(f(theta_T) - f*): the final-loss gradient vanishes as the inner
        # runs converge (and Adam's step with it); the log keeps it at the rate's scale
        "metamd-log-loss": MetaMD(family, **common, meta_objective="log-final-loss"),
    }
    training = {}
    specs = {"sgd": "sgd", "sgdm": "sgdm", "adam": "adam"}
    for name, learner in learners.items():
        path = out / f"{name}.safetensors"
        training[name] = _train(name, learner, args.outer_steps, path)
        training[name]["M_diag"] = (
            torch.exp(-learner.preconditioner.blocks["theta"].log_scale).reshape(-1).tolist()
        )
        specs[name] = f"learned:{path}"
    held_out = family.sample(torch.Generator().manual_seed(10_000 + args.seed))
    target = held_out.info["minimum"] + args.tol
    summary = _compare(
        held_out,
        specs,
        out / "comparison",
        steps=args.steps,
        grids={"lr": LOG_GRID, "weight_decay": (0.0,)},
        target_loss=target,
        select_on="loss",
        tune_steps=args.tune_steps,
        tune_on=args.tune_on,
    )
    return {
        "experiment": f"meta-quadratics/{args.variant}",
        "Q": torch.diagonal(held_out.info["Q"]).tolist(),
        "target": f"f - f* <= {args.tol}",
        "training": training,
        "comparison": summary,
    }


# --- linear-regression family --------------------------------------------------------------
def linreg(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import get_family

    family = get_family("linear-regression-family")
    out = Path(args.out)
    common = dict(
        PAPER,
        inner_steps=args.inner_steps,
        tasks_per_step=4,
        lr=args.inner_lr,
        seed=args.seed,
        preconditioner_options={"init_scale": 0.1},
    )
    learners = {
        "metamd": MetaMD(family, **common, meta_lr=args.meta_lr),
        "metamd-final-loss": MetaMD(
            family,
            **common,
            engine="unroll",
            window=min(20, args.inner_steps),
            meta_objective="final-loss",
            meta_lr=args.meta_lr,
        ),
    }
    training, specs = {}, {"sgdm": "sgdm", "adam": "adam"}
    for name, learner in learners.items():
        path = out / f"{name}.safetensors"
        training[name] = _train(name, learner, args.outer_steps, path)
        specs[name] = f"learned:{path}"
    held_out = family.sample(torch.Generator().manual_seed(10_000 + args.seed))
    summary = _compare(
        held_out,
        specs,
        out / "comparison",
        steps=args.steps,
        grids={"lr": LOG_GRID[4:], "weight_decay": (0.0,)},
        target_loss=args.target,
        select_on="loss",
        tune_steps=args.tune_steps,
    )
    return {
        "experiment": "linear-regression-family",
        "target_loss": args.target,
        "training": training,
        "comparison": summary,
    }


# --- rotated digits, leave one domain out ----------------------------------------------------
def digits(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import get_suite

    suite = get_suite("rotated-digits")
    out = Path(args.out) / f"holdout-{args.holdout}"
    train_tasks = suite.meta_train_tasks(args.holdout)
    common = dict(
        inner_steps=args.inner_steps,
        tasks_per_step=args.tasks_per_step,
        lr=args.inner_lr,
        seed=args.seed,
        meta_lr=args.meta_lr,
    )
    unrolled = dict(engine="unroll", window=min(args.truncate, args.inner_steps))
    # default: the paper's MetaMD (Eq. 8, Neumann) against the competitors' own final-loss;
    # --meta-objective gives all three the same objective (MetaMD then through the same
    # truncated unroll as the competitors); --learn-scale adds MetaMD's learnable c
    shared = {"meta_objective": args.meta_objective} if args.meta_objective else {}
    metamd = {
        **PAPER,
        **common,
        "preconditioner_options": {"learn_scale": args.learn_scale},
        **({**shared, **unrolled} if shared else {"objective_options": {"gamma": args.gamma}}),
    }
    competitor = {**common, **COMPETITOR, **unrolled, **shared}
    learners = {
        "metamd": MetaMD(train_tasks, **metamd),
        "metasgd": MetaSGD(train_tasks, **competitor),
        "metacurvature": MetaCurvature(train_tasks, **competitor),
    }
    training, specs = {}, {"sgdm": "sgdm", "adam": "adam"}
    for name, learner in learners.items():
        path = out / f"{name}.safetensors"
        training[name] = _train(name, learner, args.outer_steps, path)
        specs[name] = f"learned:{path}"
    summary = _compare_digits(suite.meta_test_task(args.holdout), specs, out / "comparison", args)
    return {
        "experiment": f"rotated-digits/holdout={args.holdout}",
        "training": training,
        "comparison": summary,
    }


def _compare_digits(
    task: Any, specs: dict[str, str], out: Path, args: argparse.Namespace, **grids: Any
) -> Any:
    """The rotated-digits protocol: lr grid per spec at a fixed weight decay, 3 seeds."""
    return _compare(
        task, specs, out, steps=args.steps, grids={"weight_decay": (args.weight_decay,), **grids}
    )


# --- the same learned files deployed with momentum -------------------------------------------
def momentum(args: argparse.Namespace) -> dict[str, Any]:
    """Re-deploy the files of a ``digits`` run (SGD rule) with heavy-ball momentum 0.9, to
    separate the learned ``M`` from momentum: with ``M = I`` it is exactly SGD-momentum.
    Every spec tunes lr on SGD-momentum's grid (not the file's lr x factors)."""
    from meta_test.space import LR_GRID
    from tasks import get_suite

    run_dir = Path(args.out) / f"holdout-{args.holdout}"
    specs = {"sgdm": "sgdm"}
    for name in ("metamd", "metasgd", "metacurvature"):
        specs[f"{name}+momentum"] = f"learned:{run_dir / (name + '.safetensors')}?momentum=0.9"
    task = get_suite("rotated-digits").meta_test_task(args.holdout)
    summary = _compare_digits(task, specs, run_dir / "momentum", args, lr=LR_GRID)
    return {
        "experiment": f"rotated-digits/holdout={args.holdout} deployed with momentum 0.9",
        "comparison": summary,
    }


# --- closed form vs Neumann on the MLP -------------------------------------------------------
def agreement(args: argparse.Namespace) -> dict[str, Any]:
    from metaopt.learners.metamd.window import InnerRun
    from tasks import get_suite

    task = get_suite("rotated-digits").task("0")
    learner = MetaMD(
        [task],
        **PAPER,
        tasks_per_step=1,
        inner_steps=args.inner_steps,
        lr=args.inner_lr,
        preconditioner_options={"init_scale": 0.5},
        engine="closed_form",
    )
    cfg, rule, hp = learner.config, learner.rule, learner.rule_hparams

    def run(config: Any) -> tuple[torch.Tensor, float]:
        variant = MetaMD([task], config)  # the same seed: the same preconditioner values
        times, flat = [], None
        for _ in range(args.repeats):  # the engine call (the window included), median
            inner = InnerRun.start(task, 0, 0, 0, rule, hp, config.batch_size)
            problem, options = variant.window_problem(inner, config.inner_steps)
            start = time.perf_counter()
            res = variant.engine.obj(problem, None, **options)
            times.append(time.perf_counter() - start)
            flat = torch.cat([g.reshape(-1) for g in res.grads])
        return flat, sorted(times)[len(times) // 2]

    warm = dataclasses.replace(cfg, engine="neumann", engine_options={"iterations": 5})
    run(warm)  # warm-up: the first torch.func transforms of a process are slower
    exact, t_exact = run(cfg)
    out: dict[str, Any] = {
        "experiment": "closed_form vs neumann (metamd-mlp, rotated-digits/0)",
        "inner_steps": args.inner_steps,
        "closed_form_engine_seconds": t_exact,
    }
    for J in (1, 5, 20, 50, 100):
        c = dataclasses.replace(
            cfg, engine="neumann", engine_options={"iterations": J, "alpha": args.alpha}
        )
        f, t = run(c)
        out[f"neumann_J{J}"] = {
            "cosine": float(f @ exact / (f.norm() * exact.norm())),
            "engine_seconds": t,
            "cost_vs_closed_form": t / t_exact,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "experiment", choices=["quadratics", "linreg", "digits", "momentum", "agreement"]
    )
    p.add_argument("--out", default=None)
    p.add_argument("--variant", default="mild")
    p.add_argument("--holdout", default="0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outer-steps", type=int, default=60)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--inner-lr", type=float, default=0.02)
    p.add_argument("--meta-lr", type=float, default=0.01)
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--k-lambda", type=float, default=0.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tasks-per-step", type=int, default=4)
    p.add_argument("--truncate", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--tune-steps", type=int, default=None, help="steps of the search runs (default --steps)"
    )
    p.add_argument(
        "--tune-on",
        choices=["loss", "iterations"],
        default="loss",
        help="quadratics: pick each optimizer's lr by the loss after --tune-steps, or by the "
        "fewest iterations to the target within --tune-steps (same rule for every optimizer)",
    )
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument(
        "--meta-objective",
        default=None,
        help="digits: one meta-objective for all three learners (default: their own)",
    )
    p.add_argument("--learn-scale", action="store_true", help="digits: MetaMD learns c too")
    p.add_argument("--target", type=float, default=0.02)
    args = p.parse_args()
    torch.set_num_threads(1)
    fn = {
        "quadratics": quadratics,
        "linreg": linreg,
        "digits": digits,
        "momentum": momentum,
        "agreement": agreement,
    }
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.out = tmp
            result = fn[args.experiment](args)
    else:
        result = fn[args.experiment](args)
    print(
        json.dumps(
            result, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)
        )
    )


if __name__ == "__main__":
    main()
