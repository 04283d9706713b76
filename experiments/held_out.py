"""The held-out table: meta-train with the defaults, meta-test against tuned baselines.

For every domain of a suite in turn, exactly what a user runs::

    python -m meta_train --learner metamd --suite SUITE --holdout D --out RUNS/D/meta_train
    python -m meta_test --suite SUITE --domain D --optimizers adam,sgdm,learned:... \\
        --hpo grid --seeds 0,1,2 --steps 300 --out RUNS/D/meta_test

(``--family F --test-task T`` does the same for a task family and one of its unseen tasks).
Extra ``meta_train`` flags (``--preset metamd-paper``, ...) pass through after ``--``. The
summary (per domain and optimizer: training-loss AUC, test metric, tuned hyperparameters,
meta-training wall time) is written as JSON (rendered into the results pages by
``tools/results_pages.py``) and printed as a Markdown table.

    python experiments/held_out.py --suite rotated-digits --runs runs/held_out \\
        --out docs/results/learned/rotated-digits [--domains 0,75] [-- --preset metamd-paper]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

BASELINES = ("adam", "sgdm")


def _run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def one(
    args: argparse.Namespace, train_label: str, test_label: str, source: list[str], test: list[str]
) -> dict:
    train_dir = Path(args.runs) / train_label / "meta_train"
    test_dir = Path(args.runs) / train_label / f"meta_test-{test_label}"
    train_s = None
    if not (train_dir / "learned_optimizer.safetensors").exists():
        train_s = _run([sys.executable, "-m", "meta_train", "--learner", args.learner, *source,
                        "--out", str(train_dir), "--no-progress", *args.meta_train])  # fmt: skip
    learned = f"learned:{train_dir / 'learned_optimizer.safetensors'}"
    specs = ",".join([*BASELINES, learned])
    if not (test_dir / "results.json").exists():
        _run([sys.executable, "-m", "meta_test", *test, "--optimizers", specs, "--hpo", "grid",
              "--seeds", args.seeds, "--steps", str(args.steps), "--out", str(test_dir),
              "--no-progress"])  # fmt: skip
    results = json.loads((test_dir / "results.json").read_text())
    row = {"meta_train_seconds": train_s, "optimizers": {}}
    for spec, r in results["optimizers"].items():
        name = "learned" if spec.startswith("learned:") else spec
        row["optimizers"][name] = {
            "auc_train_loss": r["auc_train_loss"]["mean"],
            "test_metric": r["test_metric"]["mean"],
            "test_metric_name": r["test_metric_name"],
            "hparams": r["hparams"],
        }
    return row


def table(summary: dict, filename: str = "summary.json") -> str:
    """``summary`` as the results page shows it (``tools/results_pages.py``'s renderer)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "results_pages.py"
    spec = importlib.util.spec_from_file_location("results_pages", path)
    pages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pages)
    return pages.learned_section(filename, summary)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", help="a suite, every domain held out in turn")
    ap.add_argument("--domains", help="comma-separated domains (default: all)")
    ap.add_argument("--family", help="a task family (with --test-tasks)")
    ap.add_argument("--test-tasks", help="comma-separated unseen tasks of the family")
    ap.add_argument("--learner", default="metamd")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", required=True, help="folder for the runs (reused if present)")
    ap.add_argument("--out", required=True, help="OUT.json is written")
    args = ap.parse_args(argv)
    args.meta_train = extra
    rows = {}
    if args.suite:
        import tasks

        domains = args.domains.split(",") if args.domains else tasks.get_suite(args.suite).domains
        for d in domains:
            rows[d] = one(args, d, d, ["--suite", args.suite, "--holdout", d],
                          ["--suite", args.suite, "--domain", d])  # fmt: skip
    else:
        for t in args.test_tasks.split(","):
            rows[t] = one(args, "family", t.replace(":", "-"), ["--family", args.family],
                          ["--task", t])  # fmt: skip
    summary = {"source": args.suite or args.family, "meta_train_flags": extra,
               "steps": args.steps, "seeds": args.seeds, "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    # the docs render the same JSON the same way: python tools/results_pages.py
    print(table(summary, out.with_suffix(".json").name))


if __name__ == "__main__":
    main()
