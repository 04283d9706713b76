"""``run_comparison``: the whole protocol for several specs on one task.

For every spec, with the same budget:

1. search its :class:`~meta_test.space.SearchSpace` (``hpo``; the values fixed by the
   spec's query, ``sgdm?momentum=0.5``, are not searched): each trial trains
   ``search_steps`` steps (default ``steps``) from each of ``search_seeds`` (default: the
   first seed) and is scored by the aggregate over those seeds (median by default) of the
   selected quantity: by default the validation metric (accuracy maximised; MSE
   minimised; the validation loss for synthetic tasks, ``task.info["synthetic"]``), or
   the training-split loss, or the steps to ``target_loss`` (:mod:`meta_test.selection`,
   which also says how ties are broken); a diverged trial scores worst;
2. re-run the selected configuration on every seed for ``steps`` steps, recording curves;
3. summarise (:mod:`meta_test.metrics`) into the ``results.json`` dict.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from meta_test.metrics import auc, mean_curve, mean_std, steps_to_target
from meta_test.runs import RunResult, run_training
from meta_test.search import HPO_METHODS, SearchResult, Trial, run_search
from meta_test.selection import AGGREGATES, Selection, selection_objective
from meta_test.space import SearchSpace
from meta_test.specs import (
    build_trainer,
    canonical_spec,
    check_spec,
    input_files,
    search_space,
    split_spec,
)
from metaopt.cli_support import MAX_SEED, check_int

__all__ = ["run_comparison", "selection_objective"]


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _trial_record(t: Trial) -> dict[str, Any]:
    record = {"config": t.config, "value": _finite_or_none(t.value)}
    if t.tiebreak is not None:
        record["tiebreak"] = _finite_or_none(t.tiebreak)
    return {**record, **t.detail}


def _seed_list(name: str, seeds: Sequence[int]) -> list[int]:
    seeds = [check_int(f"{name}[{k}]", s, 0, MAX_SEED) for k, s in enumerate(seeds)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{name}={seeds!r}: must be distinct non-negative integers (at least one)")
    return seeds


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


def _check_budget(spaces: Mapping[str, Any], hpo: str, allow_unequal: bool) -> dict[str, int]:
    """Trials per spec under ``hpo="grid"`` (``{}`` otherwise); unequal sizes are refused
    unless ``allow_unequal``."""
    if hpo != "grid":
        return {}
    sizes = {spec: (s.grid_size() if s.dims else 1) for spec, s in spaces.items()}
    if len(set(sizes.values())) > 1 and not allow_unequal:
        raise ValueError(
            f"grid sizes differ between optimizers ({sizes}); the protocol gives every "
            "optimizer the same budget: make the grids the same size (or pass "
            "allow_unequal_budget=True / --allow-unequal-budget, which the report states)"
        )
    return sizes


def _validate(task: Any, spec: str, configs: list[dict[str, Any]]) -> None:
    """Build ``spec`` on a throwaway model for each config so bad input fails before any
    training (e.g. ``learned:<path>`` for another architecture, unknown hyperparameters)."""
    for config in configs:
        try:
            build_trainer(spec, task.make_model(0), task, config)
        except TypeError as err:
            raise ValueError(f"optimizer {spec!r} with hparams {config}: {err}") from None


def _summary(
    runs: list[RunResult], search: SearchResult, target_loss: float | None, log_every: int
) -> dict[str, Any]:
    curves = [r.train_loss for r in runs]
    mean = mean_curve(curves)
    n = runs[0].steps
    idx = sorted(set(range(0, n, log_every)) | {n - 1})
    std = [mean_std([c[i] if i < len(c) else math.inf for c in curves])["std"] for i in idx]
    metric = runs[0].metric
    mem = [r.peak_memory_mb for r in runs]
    hp_keys = sorted({k for r in runs for k in r.hparams_adapted})
    adapted = {}
    for k in hp_keys:
        series = [r.hparams_adapted.get(k, []) for r in runs]
        m = min(len(s) for s in series)
        adapted[k] = [sum(s[i] for s in series) / len(series) for i in range(m)]
    n_adapted = min((len(v) for v in adapted.values()), default=0)
    return {
        "hparams": dict(search.best),
        "final_train_loss": mean_std([r.final["train_loss"] for r in runs]),
        "auc_train_loss": mean_std([math.inf if r.diverged else auc(r.train_loss) for r in runs]),
        "test_metric": mean_std([r.final[f"test_{metric}"] for r in runs]),
        "test_metric_name": metric,
        "sec_per_iter": mean_std([r.sec_per_iter for r in runs]),
        "mean_sec_per_iter": mean_std([r.mean_sec_per_iter for r in runs]),
        "steps_to_target": steps_to_target(mean, target_loss) if mean else None,
        "num_meta_parameters": runs[0].num_meta_parameters,
        "peak_memory_mb": None if None in mem else mean_std(mem),  # type: ignore[arg-type]
        "diverged_seeds": sum(r.diverged for r in runs),
        "search": {
            "method": search.method,
            "budget": len(search.trials),
            "best_value": _finite_or_none(search.best_value),
            "trials": [_trial_record(t) for t in search.trials],
        },
        "curves": {
            "steps": idx,
            "train_loss_mean": [_finite_or_none(mean[i]) if i < len(mean) else None for i in idx],
            "train_loss_std": std,
            "eval_steps": max((r.eval_steps for r in runs), key=len),
            "test_metric_mean": mean_curve([r.eval_metric for r in runs]),
            "hparam_steps": max((r.hparam_steps for r in runs), key=len)[:n_adapted],
            "hparams": adapted,
        },
    }


def run_comparison(
    task: Any,
    specs: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int] = (0, 1, 2),
    hpo: str = "grid",
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    iterations: int = 25,
    grids: Mapping[str, Sequence[float]] | None = None,
    log_every: int | None = None,
    eval_every: int | None = None,
    target_loss: float | None = None,
    search_seed: int | None = None,
    search_seeds: Sequence[int] | None = None,
    search_aggregate: str = "median",
    search_steps: int | None = None,
    select_on: str = "auto",
    spaces: Mapping[str, SearchSpace] | None = None,
    device: str | None = None,
    progress: bool = False,
    allow_unequal_budget: bool = False,
    task_options: Mapping[str, Any] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Tune, train and summarise every spec on ``task``; returns the ``results.json`` dict.

    Args:
        task: a ``tasks.Task`` or a registered task name (built with ``task_options``).
        specs: optimizer specs (``meta_test.specs``), e.g. ``["sgdm", "adam", "kfac"]``.
        steps: training steps per run (>= 1).
        seeds: seeds of the reported runs, distinct integers in ``[0, 2**32 - 1]`` (default
            ``(0, 1, 2)``).
        hpo: ``"none"``, ``"grid"``, ``"botorch"`` (or ``"random"``).
        out: directory for ``results.json``, ``report.md`` and plots (``None``: no files).
            Refused if non-empty unless ``overwrite``, and even then if it holds an input
            of the run (``inputs``, a ``learned:<path>`` file) or a meta_train run; written
            to a temporary directory and moved into place only when everything succeeded.
        iterations: evaluations per spec for ``"botorch"`` / ``"random"`` (default 25).
        grids: ``{hparam: values}`` overriding the grids (and search boxes) of every spec
            that tunes ``hparam``.
        log_every: curve resolution in steps (default ``max(1, steps // 100)``).
        eval_every: test-metric curve resolution (default ``max(1, steps // 10)``).
        target_loss: loss for ``steps_to_target`` (``None``: reported as ``null``; needed
            by ``select_on="steps-to-target"``).
        search_seed: seed of the search trials (default ``seeds[0]``); the same as
            ``search_seeds=[search_seed]``.
        search_seeds: seeds every search trial trains from; a configuration scores the
            ``search_aggregate`` of its per-seed scores (default ``[search_seed]``).
        search_aggregate: ``"median"`` (default) or ``"mean"`` over ``search_seeds``.
        search_steps: training steps of each search trial (default ``steps``): a tuning
            horizon shorter (or longer) than the reported runs'.
        select_on: ``"auto"``, ``"loss"``, the task's metric, ``"train-loss"`` or
            ``"steps-to-target"`` (see :mod:`meta_test.selection`, also for ties).
        spaces: ``{spec: SearchSpace}`` replacing the search space of the named specs
            (their query's fixed values and ``grids`` still apply on top).
        device: move the task there (``"cpu"``, ``"cuda"``, ...).
        progress: show a tqdm bar (stderr) over all training steps.
        allow_unequal_budget: accept grids of different sizes (``protocol.equal_budget``
            and the report then say so); refused by default.
        task_options: options for a task given by name.
        inputs: files and folders the run reads besides ``learned:<path>`` specs (e.g. the
            data root), which ``out`` must not hold.
    """
    from meta_test import report

    if isinstance(task, str):
        from tasks import get_task

        task = get_task(task, **dict(task_options or {}))
    if device is not None:
        task = task.with_device(device)
    steps = _positive_int("steps", steps)
    seeds = _seed_list("seeds", seeds)
    if search_seeds is not None and search_seed is not None:
        raise ValueError("search_seed and search_seeds: give one of them")
    if search_seed is not None:
        search_seeds = [check_int("search_seed", search_seed, 0, MAX_SEED)]
    search_seeds = _seed_list("search_seeds", seeds[:1] if search_seeds is None else search_seeds)
    if search_aggregate not in AGGREGATES:
        raise ValueError(
            f"search_aggregate={search_aggregate!r}: must be one of {list(AGGREGATES)}"
        )
    search_steps = _positive_int("search_steps", steps if search_steps is None else search_steps)
    if hpo not in HPO_METHODS:
        raise ValueError(f"hpo={hpo!r}: must be one of {list(HPO_METHODS)}")
    if hpo == "botorch" and importlib.util.find_spec("botorch") is None:
        raise ValueError("hpo='botorch' needs BoTorch: pip install 'metaopt[bayesopt]'")
    if target_loss is not None and not math.isfinite(target_loss):
        raise ValueError(f"target_loss={target_loss!r}: must be a finite number")
    specs = [check_spec(s) for s in specs]
    if not specs or len({canonical_spec(s) for s in specs}) != len(specs):
        raise ValueError(f"specs={specs!r}: give at least one optimizer, each once")
    log_every = max(1, steps // 100) if log_every is None else log_every
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    log_every = _positive_int("log_every", log_every)
    eval_every = _positive_int("eval_every", eval_every)
    inputs = [*inputs, *(f for s in specs for f in input_files(s))]
    if out is not None:
        report.check_out_dir(out, overwrite, inputs)
    selection = Selection.for_task(task, select_on, target_loss)
    spaces = _spaces(specs, spaces or {}, grids or {})
    known = {n for sp in spaces.values() for n in [*sp.names, *sp.fixed]}
    unused = set(grids or {}) - known  # a typo must not silently leave the default grid
    if unused:
        raise ValueError(f"grids: {sorted(unused)} are tuned by none of {specs}")
    if hpo in ("botorch", "random"):
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r}: must be a positive integer")
        for sp in spaces.values():
            for d in sp.dims:
                d.check_box()
    sizes = _check_budget(spaces, hpo, allow_unequal_budget)
    for s, space in spaces.items():
        first = next(space.grid_points()) if space.dims else space.default_point()
        _validate(task, s, [space.default_point()] if hpo == "none" else [first])

    n_trials = {"none": 0, "botorch": iterations, "random": iterations}
    trials = [
        sizes[s] if hpo == "grid" else n_trials[hpo] if spaces[s].dims else min(n_trials[hpo], 1)
        for s in specs
    ]
    total = steps * len(seeds) * len(specs) + search_steps * len(search_seeds) * sum(trials)
    bar = _bar(total, progress)
    results: dict[str, Any] = {
        "task": task.name,
        "steps": steps,
        "seeds": seeds,
        "hpo": hpo,
        "optimizers": {},
        "protocol": {
            "select_on": selection.label,
            "maximize": selection.maximize,
            "search_seed": search_seeds[0],
            "search_seeds": search_seeds,
            "search_aggregate": search_aggregate,
            "search_steps": search_steps,
            "iterations": iterations if hpo in ("botorch", "random") else None,
            "grids": {s: {d.name: list(d.grid) for d in sp.dims} for s, sp in spaces.items()},
            "fixed": {s: dict(sp.fixed) for s, sp in spaces.items()},
            "log_every": log_every,
            "eval_every": eval_every,
            "target_loss": target_loss,
            "device": str(task.device),
            "equal_budget": len(set(trials)) == 1,
        },
    }
    try:
        for spec in specs:
            bar.set_postfix_str(f"{spec}: search")

            def objective(config: dict[str, Any], spec: str = spec) -> Any:
                scores = {
                    seed: selection.score(
                        run_training(
                            task,
                            spec,
                            config,
                            seed=seed,
                            steps=search_steps,
                            log_every=log_every,
                            final_splits=selection.splits,
                            progress=bar.update,
                        )  # fmt: skip
                    )
                    for seed in search_seeds
                }
                return selection.aggregate(scores, search_aggregate)

            found = run_search(
                spaces[spec], objective, method=hpo, iterations=iterations,
                maximize=selection.maximize, seed=search_seeds[0],
            )  # fmt: skip
            bar.set_postfix_str(f"{spec}: seeds")
            runs = [
                run_training(
                    task,
                    spec,
                    found.best,
                    seed=seed,
                    steps=steps,
                    log_every=log_every,
                    eval_every=eval_every,
                    progress=bar.update,
                )  # fmt: skip
                for seed in seeds
            ]
            results["optimizers"][spec] = _summary(runs, found, target_loss, log_every)
    finally:
        bar.close()
    if out is not None:
        report.write_outputs(results, out, overwrite=overwrite, inputs=inputs)
    return results


def _spaces(
    specs: Sequence[str], given: Mapping[str, SearchSpace], grids: Mapping[str, Sequence[float]]
) -> dict[str, SearchSpace]:
    """Each spec's search space: ``given[spec]`` or its own, the query's values fixed, then
    ``grids`` overriding the dims it names."""
    by_name = {canonical_spec(s): sp for s, sp in given.items()}
    unknown = sorted(set(by_name) - {canonical_spec(s) for s in specs})
    if unknown:
        raise ValueError(f"spaces: {unknown} are not among the specs {list(specs)}")
    out = {}
    for s in specs:
        space = by_name.get(canonical_spec(s))
        if space is None:
            space = search_space(s)
        elif not isinstance(space, SearchSpace):
            raise ValueError(f"spaces[{s!r}]={space!r}: must be a meta_test.SearchSpace")
        else:
            space = space.fix(split_spec(s)[1])
        out[s] = space.override(dict(grids))
    return out


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
