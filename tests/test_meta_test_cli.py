"""The CLI: results.json schema, report and plots, and bad inputs (exit 2, one line, no
files touched)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import metaopt
import tasks
from meta_test import run_comparison
from meta_test.cli import main
from meta_test.comparison import selection_objective
from meta_test.report import REQUIRED_KEYS
from meta_test.space import ADAM_LR_GRID, LR_GRID, WD_GRID
from metaopt.kron import KroneckerPreconditioner

TASK = "meta-test-tiny"


@tasks.register_task(TASK)
def _tiny(width: int = 1, **options) -> tasks.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = x @ torch.randn(4, width, generator=g)
    train, val, test = (TensorDataset(x[i::3], y[i::3]) for i in range(3))
    return tasks.Task(TASK, lambda: nn.Linear(4, width), nn.functional.mse_loss, "mse",
                      train, val, test, batch_size=8, **options)  # fmt: skip


def _stat(d: dict) -> None:
    assert set(d) >= {"mean", "std"}
    assert all(isinstance(d[k], float) for k in ("mean", "std"))


def test_cli_writes_schema_valid_results_report_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["--task", TASK, "--optimizers", "sgdm,adam", "--steps", "20", "--seeds", "0,1",
            "--target-loss", "0.5",
            "--hpo", "grid", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == TASK and res["steps"] == 20 and res["seeds"] == [0, 1]
    assert res["hpo"] == "grid" and set(res["optimizers"]) == {"sgdm", "adam"}
    for spec, r in res["optimizers"].items():
        assert set(r) >= set(REQUIRED_KEYS)
        for key in (
            "final_train_loss",
            "auc_train_loss",
            "test_metric",
            "sec_per_iter",
            "mean_sec_per_iter",
        ):
            _stat(r[key])
        assert r["test_metric_name"] == "mse"
        assert r["steps_to_target"] is None or isinstance(r["steps_to_target"], int)
        assert isinstance(r["num_meta_parameters"], int)
        grid = ADAM_LR_GRID if spec == "adam" else LR_GRID
        assert r["hparams"]["lr"] in grid and r["hparams"]["weight_decay"] in WD_GRID
        assert r["search"]["budget"] == len(grid) * len(WD_GRID)
        best = min(r["search"]["trials"], key=lambda t: t["value"])
        assert best["config"] == r["hparams"]  # the selected config is the validation best
    assert (out / "report.md").read_text().count("\n| ") == 3  # header + one row per spec
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "train_loss.png",
                                                "test_metric.png"}  # fmt: skip
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_comparison_botorch_budget_and_worst_score_for_divergence() -> None:
    res = run_comparison(TASK, ["sgd"], steps=10, seeds=[0], hpo="botorch", iterations=6,
                         grids={"lr": [1e-3, 100.0]})  # fmt: skip
    r = res["optimizers"]["sgd"]
    assert r["search"]["budget"] == 6
    values = [t["value"] for t in r["search"]["trials"]]
    assert r["hparams"]["lr"] <= 100.0 and r["search"]["best_value"] == min(
        v for v in values if v is not None
    )
    assert 1e-3 <= r["hparams"]["lr"] <= 100.0


def test_selection_objective() -> None:
    t = _tiny()
    assert selection_objective(t) == ("mse", False)
    t.info["synthetic"] = True
    assert selection_objective(t) == ("loss", False)
    t.metric = "accuracy"
    assert selection_objective(t) == ("accuracy", True)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _bad_file(tmp_path: Path) -> str:
    """A learned optimizer saved for a 4 -> 3 linear model: the wrong architecture."""
    pre = KroneckerPreconditioner.for_model(nn.Linear(4, 3), "rank1")
    path = tmp_path / "other.safetensors"
    metaopt.save_learned_optimizer(metaopt.LearnedOptimizer(pre, "sgd", {}, 0.1), path)
    return str(path)


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("optimizer", ["--optimizers", "sgdm,nope"], "optimizer spec='nope' is unknown"),
        ("task", ["--task", "no-such-task"], "task='no-such-task' is unknown"),
        ("steps", ["--steps", "-5"], "--steps -5: must be a positive integer"),
        ("nonempty", [], "is not empty; pass --overwrite"),
        ("learned", ["--optimizers", "LEARNED"], "does not fit this model"),
        ("hpo", ["--hpo", "bayes"], "hpo='bayes'"),
        ("flag", ["--bogus"], "unrecognized arguments"),
        ("grid-name", ["--grid", "lrr=0.1"], "grids: ['lrr'] are tuned by none"),
        ("grid-zero", ["--hpo", "botorch", "--grid", "weight_decay=0,0.1"], "needs low > 0"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    tmp_path, capsys, case, extra, message
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if case == "nonempty":
        (out / "keep.txt").write_text("precious")
    args = {"--task": TASK, "--optimizers": "sgdm", "--steps": "5", "--seeds": "0",
            "--hpo": "none", "--out": str(out)}  # fmt: skip
    flags = []
    for i in range(0, len(extra) - 1, 2):
        args[extra[i]] = extra[i + 1].replace("LEARNED", f"learned:{_bad_file(tmp_path)}")
    if len(extra) % 2:
        flags = extra[-1:]
    before = _snapshot(tmp_path)
    argv = [x for kv in args.items() for x in kv] + flags + ["--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meta_test: error: ")
    assert message in err
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed
    assert sorted(os.listdir(tmp_path)) == sorted({Path(k).parts[0] for k in before} | {"out"})


def test_overwrite_replaces_and_module_entry_point_exits_2(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["--task", TASK, "--optimizers", "sgd", "--steps", "3", "--seeds", "0",
            "--hpo", "none", "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "old.txt").exists() and (out / "results.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "meta_test", "--task", "rosenbrock", "--optimizers", "sgd",
         "--steps", "0", "--out", str(tmp_path / "new")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("meta_test: error: --steps 0: must be a positive integer")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("task", ["rosenbrock", "ill-conditioned-regression"])
def test_real_synthetic_tasks_with_kfac_and_grid(tmp_path, task) -> None:
    out = tmp_path / task
    argv = ["--task", task, "--optimizers", "sgdm,adam,kfac", "--steps", "30", "--seeds", "0,1",
            "--hpo", "grid", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["optimizers"]) == {"sgdm", "adam", "kfac"}
    for spec, r in res["optimizers"].items():
        assert set(r) >= set(REQUIRED_KEYS)
        grid = ADAM_LR_GRID if spec == "adam" else LR_GRID
        assert r["hparams"]["lr"] in grid and r["hparams"]["weight_decay"] in WD_GRID
        assert r["final_train_loss"]["mean"] is not None  # the selected config did not diverge
    assert {"results.json", "report.md", "train_loss.png", "test_metric.png"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_records_event_timing_and_peak_memory() -> None:
    from meta_test.runs import run_training

    task = _tiny(width=2, device="cuda")
    r = run_training(task, "adam", {"lr": 0.01}, seed=0, steps=20, log_every=5, eval_every=10)
    assert r.peak_memory_mb is not None and r.peak_memory_mb > 0
    assert r.sec_per_iter > 0 and not r.diverged and len(r.train_loss) == 20


def test_a_diverging_seed_is_scored_worst_without_crashing_the_comparison(tmp_path) -> None:
    from meta_test.specs import OptimizerTrainer, register_spec

    class Exploding(OptimizerTrainer):
        """SGD whose reported loss turns infinite after 3 steps when ``explode``."""

        explode, calls = False, 0

        def step(self, batch, draw_batch):
            loss = super().step(batch, draw_batch)
            self.calls += 1
            return loss * math.inf if self.explode and self.calls > 3 else loss

    def build(spec, model, task, hp):
        t = Exploding(model, task, torch.optim.SGD(model.parameters(), lr=0.05))
        t.explode = bool(model.weight.flatten()[0] > 0)  # depends on the seed
        return t

    register_spec("test-exploding", build, replace=True)
    seeds = list(range(6))
    signs = [bool(_tiny().make_model(s).weight.flatten()[0] > 0) for s in seeds]
    assert 0 < sum(signs) < len(seeds)
    res = run_comparison(TASK, ["test-exploding", "sgd"], steps=12, seeds=seeds, hpo="none",
                         log_every=2, eval_every=4, out=tmp_path / "o")  # fmt: skip
    r = res["optimizers"]["test-exploding"]
    assert r["diverged_seeds"] == sum(signs)
    assert r["final_train_loss"] == r["auc_train_loss"] == {"mean": None, "std": None}
    assert res["optimizers"]["sgd"]["diverged_seeds"] == 0
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["optimizers"]["test-exploding"]["diverged_seeds"] == sum(signs)
    assert (tmp_path / "o" / "train_loss.png").exists()


def test_unequal_grid_budgets_are_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match="grid sizes differ"):
        run_comparison(TASK, ["sgd", "l4-adam"], steps=2, seeds=[0], grids={"lr": [0.1]})
    res = run_comparison(TASK, ["sgd", "l4-adam"], steps=2, seeds=[0], grids={"lr": [0.1]},
                         allow_unequal_budget=True)  # fmt: skip
    assert res["protocol"]["equal_budget"] is False
    assert [r["search"]["budget"] for r in res["optimizers"].values()] == [3, 15]
