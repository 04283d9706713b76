"""Fill the generated tables of the results pages from the JSON in ``docs/results/``.

A results page keeps its prose by hand and marks each generated table::

    <!-- generated: NAME -->
    ...replaced on every run...
    <!-- end generated -->

``python tools/results_pages.py`` rewrites every marked region from the JSON files (run it
after an experiment writes new JSON; ``make docs`` runs it); ``--check`` only reports pages
whose tables are stale (exit 1), which the test suite uses.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGES = [RESULTS / name for name in ("apo.md", "metamd.md", "performance.md")]
REGION = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL
)


#: the file keys older JSON records use for the APO papers, as citations
_KEYS = {"000_": "Bae et al. 2022 appendix", "001_": "Bae et al. 2022 earlier version",
         "002_": "Bae et al. 2022"}  # fmt: skip


def _cite(text: str) -> str:
    for key, citation in _KEYS.items():
        text = text.replace(key, citation)
    return text


def _load(path: Path) -> Any:
    return json.loads(path.read_text())  # Python's json reads the NaN some files hold


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _hp(hp: dict[str, Any] | None) -> str:
    if not hp:
        return "defaults"
    return ", ".join(f"{k}={_num(v)}" for k, v in hp.items())


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _runs(runs: list[dict[str, Any]], best: dict[str, Any] | None = None) -> list[list[str]]:
    rows = []
    for r in runs:
        mark = " **(best)**" if best is not None and r.get("hparams") == best.get("hparams") else ""
        adapted = r.get("adapted_end") or {}
        rows.append([f"`{r['spec']}`{mark}", _hp(r.get("hparams")), _num(r.get("final_train_loss")),
                     _hp({k: v for k, v in adapted.items()}) if adapted else "—",
                     _num(r.get("first_step_below_1e-10"))])  # fmt: skip
    return rows


_RUN_HEAD = ["spec", "configuration", "final training loss", "hyperparameters at the end",
             "first step below 1e-10"]  # fmt: skip


def _claims(data: dict[str, Any]) -> str:
    items = [(k[len("claim_"):].replace("_", " "), v) for k, v in data.items()
             if k.startswith("claim_")]  # fmt: skip
    return "".join(f"- claim *{name}*: **{'met' if ok else 'not met'}**\n" for name, ok in items)


def _groups(data: dict[str, Any]) -> str:
    """Every ``{"best", "runs"}`` group of an APO experiment file as one table each."""
    out = []
    for key, group in data.items():
        if isinstance(group, dict) and "runs" in group:
            out.append(f"**{key}**" + (f" (λ_FSD = {group['lambda_fsd']})"
                                       if "lambda_fsd" in group else "") + "\n")  # fmt: skip
            out.append(_table(_RUN_HEAD, _runs(group["runs"], group.get("best"))))
    return "\n".join(out)


def apo_experiment(name: str) -> Callable[[], str]:
    def render() -> str:
        data = _load(RESULTS / "apo" / f"{name}.json")
        head = f"{data.get('steps', '?')} steps"
        for key in ("model", "protocol", "selection"):
            if key in data:
                head += f"; {key}: {_cite(str(data[key]))}"
        return f"*{head}* (`docs/results/apo/{name}.json`)\n\n{_groups(data)}\n{_claims(data)}"

    return render


def apo_ill_conditioned() -> str:
    data = _load(RESULTS / "apo" / "ill-conditioned.json")
    rows = []
    for key in ("sgdm", "kfac", "apo_precond"):
        g = data[key]
        best = g["best"]
        seeds = ", ".join(_num(v, 2) for v in best["final_train_loss_per_seed"].values())
        rows.append([key, _hp(best["hparams"]), _num(best["final_train_loss"], 2), seeds,
                     len(g["runs"])])  # fmt: skip
    table = _table(["method", "selected configuration", "median final loss", "seeds 0, 1, 2",
                    "configurations tried"], rows)  # fmt: skip
    return (f"*{data['steps']} steps; {data['selection']}* "
            f"(`docs/results/apo/ill-conditioned.json`)\n\n{table}\n{_claims(data)}")  # fmt: skip


def apo_bf16() -> str:
    data = _load(RESULTS / "apo" / "bf16-lenet.json")
    rows = []
    for precision in ("bfloat16", "float32"):
        for runs in data.get(precision, {}).values():
            for r in runs if isinstance(runs, list) else [runs]:
                rows.append([precision, f"`{r['spec']}`", _hp(r["hparams"]),
                             _num(r["final_train_loss"]), _num(r["diverged"])])  # fmt: skip
    head = ["precision", "spec", "configuration", "final training loss", "diverged"]
    return f"*{data['steps']} steps* (`docs/results/apo/bf16-lenet.json`)\n\n" + _table(head, rows)


def apo_greedy_probe() -> str:
    data = _load(RESULTS / "apo" / "rmsprop-greedy-probe.json")
    fixed, apo = data["rmsprop"], data["apo-lr:rmsprop"]
    rows = [[a["step"], _num(a["lr_in_use"]), _num(a["greedy_lr"]), _num(b["lr_in_use"]),
             _num(b["greedy_lr"])] for a, b in zip(fixed, apo, strict=True)]  # fmt: skip
    head = ["step", "RMSprop lr in use", "one-step optimal lr there", "RMSprop-APO lr in use",
            "one-step optimal lr there"]  # fmt: skip
    return "(`docs/results/apo/rmsprop-greedy-probe.json`)\n\n" + _table(head, rows)


def apo_overhead() -> str:
    data = _load(RESULTS / "apo" / "apo_overhead.json")
    rows = []
    for key, part in data.items():
        if "sec_per_step" in part:
            ratios = {k: v for k, v in part.items() if k.startswith("apo_")}
            steps = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in part["sec_per_step"].items())
            rows.append([part["part"], part["threads"], steps,
                         ", ".join(f"{k} **{v:.3f}×**" for k, v in ratios.items())])  # fmt: skip
        elif "command" in part:
            ratios = "; ".join(f"{k}: {', '.join(f'{x:.3f}' for x in v)}"
                               for k, v in part.items() if k != "command")  # fmt: skip
            rows.append([key, "1", f"`{part['command']}`", ratios])
    head = ["part", "threads", "per step", "ratios"]
    return "(`docs/results/apo/apo_overhead.json`)\n\n" + _table(head, rows)


def metamd_rotated_digits() -> str:
    files = sorted(RESULTS.glob("metamd/rotated-digits-*.json"),
                   key=lambda p: int(p.stem.rsplit("-", 1)[1]))  # fmt: skip
    data = [(p.stem.rsplit("-", 1)[1], _load(p)) for p in files]
    names = list(data[0][1]["comparison"])
    auc = [[h] + [_num(d["comparison"][n]["auc_train_loss"]) for n in names] for h, d in data]
    acc = [[h] + [f"{100 * d['comparison'][n]['test_metric']:.1f}" for n in names]
           for h, d in data]  # fmt: skip
    lr = [[h] + [_hp(d["comparison"][n]["hparams"]) for n in names] for h, d in data]
    train = [[h] + [f"{_num(d['training'][n]['meta_objective_last'])} "
                    f"({_num(d['training'][n]['skipped_tasks'])} dropped)"
                    for n in d["training"]] for h, d in data]  # fmt: skip
    head = ["held out", *names]
    return (
        "**Training-loss AUC** (200 steps, 3 seeds; lower is faster)\n\n" + _table(head, auc)
        + "\n**Test accuracy %**\n\n" + _table(head, acc)
        + "\n**Selected configuration**\n\n" + _table(head, lr)
        + "\n**Meta-objective after meta-training** (tasks dropped as non-finite)\n\n"
        + _table(["held out", *data[0][1]["training"]], train)
    )  # fmt: skip


def learned() -> str:
    files = sorted((RESULTS / "learned").glob("*.json"))
    if not files:
        return ("*No learned-optimizer results recorded yet.* `experiments/held_out.py` writes "
                "them to `docs/results/learned/` (see the commands above).\n")  # fmt: skip
    loaded = [(path, _load(path)) for path in files]
    # each source's default-recipe file (named after the source) before its variants
    loaded.sort(key=lambda pd: (pd[1]["source"], pd[0].stem != pd[1]["source"], pd[0].stem))
    return "\n".join(learned_section(path.name, d) for path, d in loaded)


def learned_section(filename: str, d: dict[str, Any]) -> str:
    """One ``experiments/held_out.py`` summary ``d`` (the file ``filename``) as Markdown: its
    source and flags, a table of every optimizer's training-loss AUC and test metric per
    held-out domain (a dash where a row lacks an optimizer) and the configurations selected."""
    flags = " ".join(d.get("meta_train_flags") or []) or "(defaults)"
    out = [
        f"### {d['source']}: `{filename}`\n\n"
        f"meta_train flags: `{flags}`; {d['steps']} steps, seeds {d['seeds']}\n"
    ]
    if d.get("note"):
        out.append(f"*{d['note']}*\n")
    names: list[str] = []
    for row in d["rows"].values():
        names += [n for n in row["optimizers"] if n not in names]
    first = next(iter(d["rows"].values()))["optimizers"]
    metric = next(iter(first.values()))["test_metric_name"]
    scale, unit = (100.0, " %") if metric == "accuracy" else (1.0, "")
    head = ["held out", *(f"{n} AUC" for n in names),
            *(f"{n} test {metric}{unit}" for n in names), "meta-train s"]  # fmt: skip
    rows = []
    for label, row in d["rows"].items():
        o = row["optimizers"]
        rows.append([label, *(_num(o[n]["auc_train_loss"], 4) if n in o else "—"
                              for n in names),
                     *(_num(scale * o[n]["test_metric"], 4) if n in o else "—"
                       for n in names),
                     _num(row.get("meta_train_seconds"))])  # fmt: skip
    out.append(_table(head, rows))
    tuned = []
    for label, row in d["rows"].items():
        o = row["optimizers"]
        tuned.append([label, *(_hp(o[n]["hparams"]) if n in o else "—" for n in names)])
    out.append("\nSelected configurations:\n\n" + _table(["held out", *names], tuned))
    return "\n".join(out)


RENDERERS: dict[str, Callable[[], str]] = {
    "apo-rosenbrock": apo_experiment("rosenbrock"),
    "apo-ill-conditioned": apo_ill_conditioned,
    "apo-digits-lr": apo_experiment("digits-lr"),
    "apo-digits-initial-lr": apo_experiment("digits-initial-lr"),
    "apo-digits-eps-rho": apo_experiment("digits-eps-rho"),
    "apo-digits-eps-rho-fixed-lr": apo_experiment("digits-eps-rho-fixed-lr"),
    "apo-bf16": apo_bf16,
    "apo-greedy-probe": apo_greedy_probe,
    "apo-overhead": apo_overhead,
    "metamd-rotated-digits": metamd_rotated_digits,
    "learned": learned,
}


def render_page(text: str, page: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"{page}: unknown generated region {name!r}")
        return f"{match.group(1)}{RENDERERS[name]().rstrip()}\n{match.group(4)}"

    return REGION.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report stale pages, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for page in PAGES:
        if not page.exists():
            continue
        text = page.read_text()
        new = render_page(text, page)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"stale results pages (run python tools/results_pages.py): {stale}", file=sys.stderr)
        return 1
    if not args.check:
        print(f"results pages: {len(stale)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
