"""Figures for the README MetaMD section from the outputs of ``experiments/metamd_claims.py``.

    python experiments/metamd_figures.py --runs /tmp/mdexp --out docs/figures

Reads ``quad-<variant>/comparison/results.json`` (loss curves; ``f - f*`` on a log scale)
and ``digits-<holdout>.log`` (the JSON summaries) and writes PNGs. Prints one JSON object
(the files written) as its last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _last_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _num(v: object, default: float = float("nan")) -> float:
    return default if v is None else float(v)  # type: ignore[arg-type]


def quadratics(runs: Path, out: Path, variant: str) -> str | None:
    from tasks import get_family

    res_path = runs / f"quad-{variant}" / "comparison" / "results.json"
    if not res_path.exists():
        return None
    res = json.loads(res_path.read_text())["optimizers"]
    family = get_family("meta-quadratics", variant=variant, dtype=torch.float64)
    minimum = family.sample(torch.Generator().manual_seed(10_000)).info["minimum"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for spec, r in res.items():
        label = spec.split("/")[-1].replace(".safetensors", "") if "learned:" in spec else spec
        steps = r["curves"]["steps"]
        gap = [
            max(v - minimum, 1e-16) if v is not None else None
            for v in r["curves"]["train_loss_mean"]
        ]
        ax.semilogy(steps, gap, label=f"{label} (lr {r['hparams'].get('lr')})")
    ax.axhline(1e-6, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("iteration")
    ax.set_ylabel("f - f*")
    ax.set_title(f"meta-quadratics/{variant}, held-out task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"metamd_quadratics_{variant}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def digits(runs: Path, out: Path) -> str | None:
    rows = {}
    for h in ("0", "15", "30", "45", "60", "75"):
        d = _last_json(runs / f"digits-{h}.log")
        if d is not None:
            rows[h] = d["comparison"]
    if not rows:
        return None
    specs = list(next(iter(rows.values())))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(specs)
    for i, s in enumerate(specs):
        xs = [j + i * width for j in range(len(rows))]
        auc = [_num(rows[h][s]["auc_train_loss"]) for h in rows]
        axes[0].bar(xs, [min(a, 10.0) for a in auc], width, label=s)  # diverged: capped
        axes[1].bar(xs, [100 * _num(rows[h][s]["test_metric"], 0.0) for h in rows], width)
    titles = ("training-loss AUC (lower is better)", "test accuracy %")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], list(rows))
        ax.set_xlabel("held-out rotation (degrees)")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].set_ylim(50, 100)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "metamd_rotated_digits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def tables(runs: Path) -> str:
    """Markdown tables of every summary found under ``runs``."""
    lines: list[str] = []
    for v in ("mild", "severe"):
        d = _last_json(runs / f"quad-{v}.log")
        if d is None:
            continue
        lines += [
            f"**{d['experiment']}** (held-out Q = diag{tuple(round(q, 3) for q in d['Q'])}, "
            f"iterations until {d['target']}):",
            "",
            "| optimizer | tuned lr | iterations | learned diag(M) |",
            "|---|---|---|---|",
        ]
        for k, r in d["comparison"].items():
            m = d["training"].get(k, {}).get("M_diag")
            m = "" if m is None else f"({m[0]:.3g}, {m[1]:.3g})"
            its = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
            lines.append(f"| {k} | {r['hparams'].get('lr')} | {its} | {m} |")
        lines.append("")
    d = _last_json(runs / "linreg.log")
    if d is not None:
        lines += [
            f"**linear-regression-family** (held-out task, steps until training loss <= "
            f"{d['target_loss']}):",
            "",
            "| optimizer | tuned lr | steps | AUC | final loss |",
            "|---|---|---|---|---|",
        ]
        for k, r in d["comparison"].items():
            its = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
            lines.append(
                f"| {k} | {r['hparams'].get('lr')} | {its} | "
                f"{_num(r['auc_train_loss']):.4g} | {_num(r['final_train_loss']):.4g} |"
            )
        lines.append("")
    rows = {h: _last_json(runs / f"digits-{h}.log") for h in ("0", "15", "30", "45", "60", "75")}
    rows = {h: d["comparison"] for h, d in rows.items() if d is not None}
    if rows:
        specs = list(next(iter(rows.values())))
        head = "| held out | " + " | ".join(specs) + " |"
        sep = "|---" * (len(specs) + 1) + "|"
        for key, title, fmt in (
            ("auc_train_loss", "training-loss AUC", "{:.3g}"),
            ("test_metric", "test accuracy %", "{:.1f}"),
        ):
            lines += [f"**rotated-digits, {title}** (200 steps, 3 seeds):", "", head, sep]
            for h, comp in rows.items():
                vals = []
                for s in specs:
                    x = comp[s][key]
                    x = None if x is None else (100 * x if key == "test_metric" else x)
                    vals.append("diverged" if x is None or x > 1e6 else fmt.format(x))
                lines.append(f"| {h} | " + " | ".join(vals) + " |")
            lines.append("")
    for h in ("0", "45"):
        d = _last_json(runs / f"momentum-{h}.log")
        if d is None:
            continue
        lines += [
            f"**{d['experiment']}**:",
            "",
            "| optimizer | tuned lr | AUC | test acc % |",
            "|---|---|---|---|",
        ]
        for k, r in d["comparison"].items():
            acc = _num(r["test_metric"], float("nan")) * 100
            lines.append(
                f"| {k} | {r['hparams'].get('lr')} | {_num(r['auc_train_loss']):.3g} | {acc:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/tmp/mdexp")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--tables", action="store_true", help="also print markdown tables")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [quadratics(runs, out, "mild"), quadratics(runs, out, "severe"), digits(runs, out)]
    if args.tables:
        print(tables(runs))
    print(json.dumps({"figures": [f for f in files if f]}))


if __name__ == "__main__":
    main()
