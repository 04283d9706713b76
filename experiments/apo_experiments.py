"""APO's done-when experiments as configurations of :func:`meta_test.run_comparison`, each
printing ONE JSON object as its last line (a progress bar goes to stderr).

Every configuration of a grid trains from the same seed for the same number of steps; the
best configuration of each method is the one with the lowest final loss on the full
training split (``select_on="train-loss"``: the APO paper selects on the final training
loss, Bae et al. 2022, appendix C.3-C.4); on the ill-conditioned regression each
configuration scores the median over seeds 0, 1, 2 (``search_seeds``). The selected
configuration is re-run on the reported seeds (``selected``); ``best.final_train_loss`` is
its search score (the median over seeds where there are several).

    OMP_NUM_THREADS=1 python experiments/apo_experiments.py rosenbrock
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py ill-conditioned
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-lr [--base sgdm|rmsprop]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-initial-lr [--base B]
        [--lambda-sgdm L] [--lambda-rmsprop L]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py digits-eps-rho --rmsprop-lr LR
        [--fixed-lr]
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py bf16-lenet
    OMP_NUM_THREADS=1 python experiments/apo_experiments.py rmsprop-greedy-probe

(LR for digits-eps-rho: the best RMSprop lr of digits-lr; L: the best lambdas of digits-lr.
``--steps N`` shortens any experiment, e.g. for a smoke run.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import tasks  # noqa: F401  (registers the tasks)
from meta_test import Dim, SearchSpace, run_comparison
from metaopt.learners.apo import greedy_lr
from metaopt.optim.rules import RMSpropState
from tasks.registry import get_task

#: the step at which a run's training loss first reaches this is reported
TARGET = 1e-10


def _summary(spec: str, r: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One row of the outputs from a ``run_comparison`` entry (its reported runs)."""
    adapted = r["curves"]["hparams"]
    return {
        "spec": spec,
        "hparams": r["hparams"],
        "final_train_loss": r["final_train_loss"]["mean"],
        "diverged": r["diverged_seeds"] > 0,
        "adapted_end": {k: v[-1] for k, v in adapted.items() if v and "/" not in k},
        "first_step_below_1e-10": r["steps_to_target"],
        "seconds": round(seconds, 1),
    }


def _compare(task: Any, spec: str, space: SearchSpace, steps: int, **kw: Any) -> dict[str, Any]:
    start = time.perf_counter()
    res = run_comparison(
        task, [spec], steps=steps, spaces={spec: space}, select_on="train-loss",
        log_every=max(1, steps // 20), eval_every=steps, target_loss=TARGET, progress=True,
        **{"seeds": (0,), **kw},
    )  # fmt: skip
    r = res["optimizers"][spec]
    return {**r, "row": _summary(spec, r, time.perf_counter() - start)}


def _run(task: Any, spec: str, hp: dict[str, Any], steps: int) -> dict[str, Any]:
    """One run of ``spec`` with ``hp`` on seed 0."""
    row = _compare(task, spec, SearchSpace(fixed=hp), steps, hpo="none")["row"]
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _grid(
    task: Any, spec: str, space: SearchSpace, steps: int, seeds: Sequence[int] = (0,)
) -> dict[str, Any]:
    """``spec`` tuned on ``space``, each configuration scored by the median over ``seeds`` of
    its final training loss (a diverged seed counts as +inf)."""
    r = _compare(task, spec, space, steps, seeds=seeds, search_seeds=seeds, hpo="grid")
    runs = []
    for t in r["search"]["trials"]:
        row = {"spec": spec, "hparams": t["config"], "final_train_loss": t["value"]}
        if len(seeds) > 1:
            row["final_train_loss_per_seed"] = t["seed_values"]
        runs.append(row)
    best = {"hparams": r["hparams"], "final_train_loss": r["search"]["best_value"]}
    out = {"best": best, "runs": runs, "selected": r["row"]}
    return {**out, "seeds": list(seeds)} if len(seeds) > 1 else out


def _lowest(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run of lowest final training loss among ``runs`` (a recorded grid's subset)."""
    ok = [r for r in runs if r["final_train_loss"] is not None]
    return min(ok, key=lambda r: r["final_train_loss"]) if ok else None


def _lr_space(lrs: Sequence[float], **fixed: Any) -> SearchSpace:
    return SearchSpace((Dim("lr", tuple(lrs)),), fixed)


def rosenbrock(steps: int = 20_000) -> dict[str, Any]:
    task = get_task("rosenbrock", dtype=torch.float64)
    lrs = (2e-3, 1.5e-3, 1.2e-3, 1e-3, 7e-4, 5e-4, 3e-4, 1e-4)
    sgd = _grid(task, "sgd", _lr_space(lrs), steps)
    common = dict(
        lambda_fsd=0.0,
        lambda_wsd=0.0,
        meta_lr=1e-2,
        warmup=0,
        precond_options={"dense_diag_max": 4},
    )
    apo = _grid(task, "apo-precond", _lr_space((3e-3, 2e-3, 1e-3), **common), steps)
    best_sgd = sgd["best"]["final_train_loss"]
    best_apo = apo["best"]["final_train_loss"]
    return {
        "experiment": "rosenbrock",
        "steps": steps,
        "sgd": sgd,
        "apo_precond": apo,
        "claim_apo_below_1e-10": best_apo is not None and best_apo < 1e-10,
        "claim_sgd_above_1e-10": best_sgd is None or best_sgd >= 1e-10,
    }


def ill_conditioned(steps: int = 3000, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Each method tuned by grid on the median final loss over ``seeds`` (initialisation and
    batch order): K-FAC's final loss jumps by orders of magnitude between neighbouring
    configurations and seeds, so one seed's best K-FAC run is a draw, not a tuned value."""
    task = get_task("ill-conditioned-regression")
    sgdm = _grid(task, "sgdm", _lr_space((0.3, 0.1, 0.03, 0.01, 0.003)), steps, seeds)
    kfac_space = SearchSpace(
        (Dim("momentum", (0.9, 0.0)), Dim("lr", (0.3, 0.1, 0.03, 0.01)),
         Dim("damping", (1e-2, 1e-3, 1e-4)))
    )  # fmt: skip
    kfac = _grid(task, "kfac", kfac_space, steps, seeds)
    common = {"lr": 0.1, "precond_momentum": 0.9, "warmup": 0, "meta_lr": 1e-2}
    apo_space = SearchSpace((Dim("lambda_fsd", (0.3, 0.1, 0.03)), Dim("lambda_wsd", (0.01, 0.001))),
                            common)  # fmt: skip
    apo = _grid(task, "apo-precond", apo_space, steps, seeds)
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


def digits_lr(bases: tuple[str, ...] = ("sgdm", "rmsprop"), steps: int = 2000) -> dict[str, Any]:
    task = get_task("digits", **DIGITS)
    out: dict[str, Any] = {
        "experiment": "digits-lr",
        "steps": steps,
        "model": "mlp 64-256-256-10",
        "protocol": "Bae et al. 2022 earlier version, section 5.2 grids; APO lr0 0.1 (sgdm) / "
        "3e-4 (rmsprop), meta RMSprop 0.1",
    }
    for base in bases:
        fixed = _grid(task, base, _lr_space(PAPER_FIXED[base] + EXTRA_FIXED[base]), steps)
        paper_best = _lowest([r for r in fixed["runs"] if r["hparams"]["lr"] in PAPER_FIXED[base]])
        lambdas = SearchSpace((Dim("lambda_fsd", PAPER_LAMBDAS[base]),))
        apo = _grid(task, f"apo-lr:{base}", lambdas, steps)
        out[base] = dict(fixed, best_paper_grid=paper_best)
        out[f"{base}_apo"] = apo
        a = apo["best"]["final_train_loss"]
        out[f"claim_{base}_apo_below_fixed_paper_grid"] = a < paper_best["final_train_loss"]
        out[f"claim_{base}_apo_below_fixed_finer_grid"] = a < fixed["best"]["final_train_loss"]
    return out


def digits_initial_lr(lambdas: dict[str, float], steps: int = 2000) -> dict[str, Any]:
    """APO from initial lrs 1e-7 .. 1e-1 (Bae et al. 2022, appendix J.2) at each base's best
    lambda of digits-lr."""
    task = get_task("digits", **DIGITS)
    out: dict[str, Any] = {"experiment": "digits-initial-lr", "steps": steps}
    for base, lam in lambdas.items():
        runs = [
            _run(task, f"apo-lr:{base}", {"lr": lr, "lambda_fsd": lam}, steps)
            for lr in (1e-7, 1e-5, 1e-3, 1e-1)
        ]
        finals = [r["final_train_loss"] for r in runs]
        ok = [v for v in finals if v is not None]
        ratio = max(ok) / min(ok) if len(ok) == len(finals) else float("inf")
        lrs = [r["adapted_end"].get("lr") for r in runs]
        lr_ratio = max(lrs) / min(lrs) if all(lrs) and len(ok) == len(finals) else float("inf")
        out[base] = {
            "lambda_fsd": lam,
            "runs": runs,
            "max_over_min": ratio,  # of the final training losses
            "claim_within_factor_2": ratio <= 2.0,
            "lr_max_over_min": lr_ratio,  # of the adapted lrs the runs end at
            "claim_lrs_within_factor_2": lr_ratio <= 2.0,
        }
    return out


def digits_eps_rho(rmsprop_lr: float = 1e-2, fixed_lr: bool = False, steps: int = 2000) -> dict:
    """RMSprop at its best fixed lr (from ``digits-lr``, same seed and steps) against APO
    adapting eps and rho (and lr) from that lr, with Bae et al. 2022's appendix D.7 protocol:
    meta-RMSprop at 0.01, lambda_fsd in {1e-3, 1e-4, 1e-5} x lambda_wsd in {1e-1, ..., 1e-6}."""
    task = get_task("digits", **DIGITS)
    fixed = _run(task, "rmsprop", {"lr": rmsprop_lr}, steps)
    wsd = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    space = SearchSpace(
        (Dim("lambda_fsd", (1e-3, 1e-4, 1e-5)), Dim("lambda_wsd", wsd)),
        {"lr": rmsprop_lr, "fixed_lr": fixed_lr},
    )
    apo = _grid(task, "apo-rmsprop-eps-rho", space, steps)
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


def bf16_lenet(steps: int = 1500) -> dict[str, Any]:
    """LeNet on the digits with the model in bf16: APO-Precond (fp32 preconditioner), SGDm,
    and K-FAC (fp32 factors) at three dampings; K-FAC also in fp32 for reference."""
    out: dict[str, Any] = {"experiment": "bf16-lenet", "steps": steps}
    for dtype in ("bfloat16", "float32"):
        task = get_task("digits", model="lenet", model_options={"input_size": 8},
                        dtype=getattr(torch, dtype), batch_size=100)  # fmt: skip
        dampings = (1e-3, 1e-2, 1e-1) if dtype == "bfloat16" else (1e-3,)
        runs = {"kfac": [_run(task, "kfac", {"lr": 0.05, "damping": d}, steps) for d in dampings]}
        if dtype == "bfloat16":
            apo = {"lr": 0.05, "lambda_fsd": 0.1, "lambda_wsd": 0.1, "warmup": 300,
                   "meta_lr": 1e-4, "precond_momentum": 0.9}  # fmt: skip
            runs["apo_precond"] = _run(task, "apo-precond", apo, steps)
            runs["sgdm"] = _run(task, "sgdm", {"lr": 0.05}, steps)
        out[dtype] = runs
    return out


PROBE_STEPS = (0, 10, 50, 200, 500, 1000, 1500, 2000)


def rmsprop_greedy_probe(steps: int = 2000) -> dict[str, Any]:
    """Why RMSprop-APO stays at a small lr on the digits (diagnosis of the digits-lr row).

    Along two trajectories -- RMSprop at its best fixed lr 0.01, and RMSprop-APO at
    lambda = 0 (digits-lr's best) from lr 3e-4 -- the one-step-optimal lr on the current
    batch (:func:`metaopt.learners.apo.greedy_lr`) at the steps of ``PROBE_STEPS``, next
    to the lr in use.
    """
    from meta_test.runs import EXTRA_STREAM_OFFSET
    from meta_test.specs import build_trainer

    task = get_task("digits", **DIGITS)
    out: dict[str, Any] = {"experiment": "rmsprop-greedy-probe", "steps": steps}
    for spec, hp in (("rmsprop", {"lr": 0.01}), ("apo-lr:rmsprop", {"lambda_fsd": 0.0})):
        model = task.make_model(0)
        model.train()
        trainer = build_trainer(spec, model, task, hp)
        batches = task.train_batches(0)
        extra = task.train_batches(EXTRA_STREAM_OFFSET)
        rows = []
        for step in range(steps + 1):
            batch = next(batches)
            if step in PROBE_STEPS:
                greedy = greedy_lr(model, task.loss, batch, "rmsprop", states=_states(trainer))
                lr = trainer.hparam_log().get("lr", hp.get("lr"))
                row = {"step": step, "lr_in_use": lr, "greedy_lr": greedy.lr,
                       "loss_after_greedy_step": greedy.loss}  # fmt: skip
                rows.append(row)
                print(json.dumps({spec: row}), file=sys.stderr, flush=True)
            if step < steps:
                trainer.step(batch, lambda extra=extra: next(extra))
        out[spec] = rows
    return out


def _states(trainer: Any) -> dict[str, Any]:
    """The RMSprop state per parameter name of an APO trainer or a ``torch.optim.RMSprop``."""
    if hasattr(trainer, "apo"):
        return dict(trainer.apo.state)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {
        names[id(p)]: RMSpropState(s["step"], s["square_avg"], s.get("momentum_buffer"))
        for p, s in trainer.optimizer.state.items()
    }


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
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each "
                        "experiment's own; fewer for a smoke run)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bases = (args.base,) if args.base else ("sgdm", "rmsprop")
    kw = {} if args.steps is None else {"steps": args.steps}
    if args.experiment == "digits-eps-rho":
        result = digits_eps_rho(args.rmsprop_lr, args.fixed_lr, **kw)
    elif args.experiment == "digits-lr":
        result = digits_lr(bases, **kw)
    elif args.experiment == "digits-initial-lr":
        lams = {"sgdm": args.lambda_sgdm, "rmsprop": args.lambda_rmsprop}
        result = digits_initial_lr({b: lams[b] for b in bases}, **kw)
    else:
        result = EXPERIMENTS[args.experiment](**kw)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
