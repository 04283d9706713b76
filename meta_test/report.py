"""Outputs of a comparison: ``results.json``, ``report.md`` and PNG plots.

Files are written into a fresh temporary directory beside ``out`` and moved into place
only once all of them are written, so a failure never leaves a half-written ``out`` and
never touches an existing one. ``overwrite=True`` replaces the whole directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaopt.cli_support import check_output_dir
from metaopt.io import current_umask

__all__ = [
    "REQUIRED_KEYS",
    "check_out_dir",
    "curve_figure",
    "plot_label",
    "render_markdown",
    "spans_decades",
    "to_json",
    "write_outputs",
    "write_plots",
]

#: Keys every optimizer entry of ``results.json`` has (the issue-6 schema).
REQUIRED_KEYS = (
    "hparams",
    "final_train_loss",
    "auc_train_loss",
    "test_metric",
    "test_metric_name",
    "sec_per_iter",
    "steps_to_target",
    "num_meta_parameters",
)


def check_out_dir(
    out: str | os.PathLike[str],
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """``ValueError`` unless ``out`` can receive the outputs.

    Refused: a file, a path under a regular file, a place this process cannot write, a
    non-empty directory without ``overwrite`` and, even with it, a directory that holds one
    of ``inputs`` (files or folders this run reads) or a meta_train run or learned
    preconditioner (a ``*.safetensors`` file, a meta_train ``config.json``), which
    replacing it would delete.
    """
    path = check_output_dir(out, beside=True)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"out={str(path)!r} is not empty; pass --overwrite to replace it")
        _check_replaceable(path, inputs)
    return path


def _check_replaceable(path: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    root = path.resolve()
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == root or root in resolved.parents:
            raise ValueError(
                f"out={str(path)!r} holds {str(item)!r}, an input of this run; --overwrite "
                "would delete it: choose another --out"
            )
    for entry in root.rglob("*"):
        if entry.suffix == ".safetensors" or (
            entry.name == "config.json" and _is_meta_train_config(entry)
        ):
            raise ValueError(
                f"out={str(path)!r} holds {str(entry.relative_to(root))!r}, part of a "
                "meta_train run or a learned preconditioner; --overwrite would delete it: "
                "choose another --out"
            )


def _is_meta_train_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"learner", "outer_steps"} <= set(config)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    return str(obj)


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(_clean(results), indent=2, allow_nan=False) + "\n"


def _fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "diverged"
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.2g}"


def _fmt_hparams(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def render_markdown(results: dict[str, Any]) -> str:
    """The report: the protocol and one table row per optimizer."""
    proto = results.get("protocol", {})
    metric = next(iter(results["optimizers"].values()), {}).get("test_metric_name", "metric")
    lines = [
        f"# meta_test: {results['task']}",
        "",
        f"- steps: {results['steps']}, seeds: {results['seeds']}, hpo: {results['hpo']}"
        + (f" ({proto['iterations']} evaluations)" if proto.get("iterations") else ""),
        f"- selection: {proto.get('select_on', '?')} "
        f"({'maximised' if proto.get('maximize') else 'minimised'}) after {results['steps']} "
        f"steps from seed {proto.get('search_seed', '?')}; the selected configuration "
        "re-run on every seed",
        "- AUC: trapezoidal area under the per-step training-loss curve divided by the "
        "number of steps (mean training loss over the run)",
        f"- target loss: {proto.get('target_loss')}, device: {proto.get('device', '?')}",
        *(
            []
            if proto.get("equal_budget", True)
            else ["- **unequal search budgets** (see the budget column): not a fair comparison"]
        ),
        "",
        f"| optimizer | selected | final train loss | AUC train loss | test {metric} "
        "| steps to target | ms/iter (median / mean) | peak MiB | meta-params | budget "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, r in results["optimizers"].items():
        sec_s = " / ".join(
            "n/a" if not stat or stat.get("mean") is None else f"{stat['mean'] * 1e3:.3g}"
            for stat in (r["sec_per_iter"], r.get("mean_sec_per_iter"))
        )
        mem = r.get("peak_memory_mb")
        lines.append(
            f"| {spec} | {_fmt_hparams(r['hparams']) or 'defaults'} | "
            f"{_fmt(r['final_train_loss'])} | {_fmt(r['auc_train_loss'])} | "
            f"{_fmt(r['test_metric'])} | {r['steps_to_target']} | {sec_s} | "
            f"{'n/a' if not mem else _fmt(mem, 3)} | {r['num_meta_parameters']} | "
            f"{r.get('search', {}).get('budget', '?')} | "
            f"{r.get('diverged_seeds', 0)}/{len(results['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_label(spec: str, specs: Sequence[str] = ()) -> str:
    """A short legend label: ``learned:<path>[?k=v]`` becomes ``learned:<file stem>[?k=v]``
    (the parent folder is kept when two of ``specs`` would otherwise read the same); other
    specs are their own label."""
    head, sep, rest = spec.partition(":")
    if not (sep and head.lower() == "learned"):
        return spec
    path, q, query = rest.partition("?")

    def short(p: str, parts: int) -> str:
        pieces = Path(p).with_suffix("").parts if p.endswith(".safetensors") else Path(p).parts
        return "/".join(pieces[-parts:])

    others = [s.partition(":")[2].partition("?")[0] for s in specs
              if s != spec and s.partition(":")[0].lower() == "learned"]  # fmt: skip
    parts = 1
    while parts < len(Path(path).parts) and short(path, parts) in {short(o, parts) for o in others}:
        parts += 1
    return f"learned:{short(path, parts)}{q}{query}"


def spans_decades(values: Sequence[float]) -> bool:
    """Whether positive ``values`` span more than a factor of 10 (then a log axis reads
    better); ``False`` when any value is not positive."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) > 10 * min(finite)


def curve_figure(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    marker: str | None = None,
) -> Any:
    """One figure of ``(label, xs, ys)`` curves: the legend outside the axes (to the right,
    so it never covers a curve) and a log y-axis when the values span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    values: list[float] = []
    for label, xs, ys in series:
        pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None and math.isfinite(y)]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label,
                    **({"marker": marker, "ms": 3} if marker else {}))  # fmt: skip
            values += [y for _, y in pts]
    if spans_decades(values):
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """``train_loss.png``, ``test_metric.png`` and, when some optimizer reports a
    hyperparameter that changes during training, ``hparams.png``. Returns the file names.

    Legends use :func:`plot_label` (a ``learned:<path>`` spec by its file name) and sit
    outside the axes; loss axes are logarithmic when the losses span decades."""
    import matplotlib.pyplot as plt

    opts = results["optimizers"]
    labels = {spec: plot_label(spec, list(opts)) for spec in opts}
    written = []

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    train = [(labels[s], r["curves"]["steps"], r["curves"]["train_loss_mean"])
             for s, r in opts.items()]  # fmt: skip
    save(curve_figure(train, xlabel="step", ylabel="training loss (mean over seeds)",
                      title=results["task"]), "train_loss.png")  # fmt: skip
    metric = next(iter(opts.values()), {}).get("test_metric_name", "metric")
    test = [(labels[s], r["curves"]["eval_steps"], r["curves"]["test_metric_mean"])
            for s, r in opts.items()]  # fmt: skip
    save(curve_figure(test, xlabel="step", ylabel=f"test {metric} (mean over seeds)",
                      title=results["task"], marker="o"), "test_metric.png")  # fmt: skip
    series = [
        (f"{labels[spec]}: {k}", r["curves"]["hparam_steps"][: len(v)], v)
        for spec, r in opts.items()
        for k, v in r["curves"]["hparams"].items()
        if len(v) > 1 and max(v) > min(v)
    ]
    if series:
        save(curve_figure(series, xlabel="step", ylabel="adapted hyperparameter",
                          title=results["task"]), "hparams.png")  # fmt: skip
    return written


def write_outputs(
    results: dict[str, Any],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``results.json``, ``report.md`` and the plots into ``out`` (all or nothing;
    ``inputs`` as for :func:`check_out_dir`)."""
    path = check_out_dir(out, overwrite, inputs).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 is not the user's choice
        (tmp / "results.json").write_text(to_json(results))
        (tmp / "report.md").write_text(render_markdown(results))
        write_plots(results, tmp)
        check_out_dir(path, overwrite, inputs)
        if not path.exists():
            os.replace(tmp, path)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # put the old directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
