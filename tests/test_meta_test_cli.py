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
from tests._cli import NO_GPU, snapshot

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
        ("steps", ["--steps", "-5"], "argument --steps: '-5': must be an integer in [1, "),
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
    before = snapshot(tmp_path)
    argv = [x for kv in args.items() for x in kv] + flags + ["--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meta_test: error: ")
    assert message in err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
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
    assert proc.stderr.startswith("meta_test: error: argument --steps: '0': must be an integer")
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


# --- strict values, output folders, --import -------------------------------------------------
BUILDS = {"n": 0}


def _counting(spec, model, task, hp):
    from meta_test.specs import OptimizerTrainer

    BUILDS["n"] += 1
    return OptimizerTrainer(model, task, torch.optim.SGD(model.parameters(), lr=0.01))


def _argv(out, *extra):
    return ["--task", TASK, "--optimizers", "sgd", "--steps", "3", "--seeds", "0",
            "--hpo", "none", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meta_test: error: "), err
    return err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "gpu0"], "--device='gpu0': must be 'cpu', 'cuda' or 'cuda:N'"),
        (["--device", "cudaXYZ"], "--device='cudaXYZ'"),
        pytest.param(["--device", "cuda"], "no CUDA GPU is visible", marks=NO_GPU),
        (["--steps", "1e20"], "argument --steps: '1e20': must be an integer in [1, 100000000]"),
        (["--steps", "100000000000000000000"], "must be an integer in [1, 100000000]"),
        (["--log-every", "0"], "argument --log-every: '0': must be an integer in [1, "),
        (["--eval-every", "-1"], "argument --eval-every"),
        (["--iterations", "0"], "argument --iterations"),
        (["--target-loss", "nan"], "argument --target-loss: 'nan': must be a finite number"),
        (["--seeds", "0,4294967296"], "--seeds=4294967296: must be an integer in [0, 4294967295]"),
        (["--optimizers", "sgd,SGD"], "give at least one optimizer, each once"),
        (["--task-option", "width=many"], "task 'meta-test-tiny' option width='many': must be int"),
        (["--task-option", "dtype=float128"], "--task-option dtype='float128': must be one of"),
        (["--task-option", 'w={"a": 1}'], "is not a value; VALUE is TOML"),
        (["--task-option", "width=1", "--task-option", "width=2"], "width: given twice"),
        (["--import", "no_such_plugin_xyz"], "--import 'no_such_plugin_xyz': cannot be imported"),
    ],
)
def test_strictly_typed_values_exit_2_before_anything(tmp_path, capsys, extra, needle) -> None:
    err = _fails(capsys, _argv(tmp_path / "out", *extra))
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_a_dtype_task_option_reaches_the_task_as_a_dtype() -> None:
    from meta_test.cli import _resolve_task, build_parser

    for text in ('dtype="float64"', "dtype=float64", "dtype=torch.float64"):
        args = build_parser().parse_args(_argv("o", "--task-option", text))
        task = _resolve_task(args)
        assert task.dtype is torch.float64
        assert next(task.make_model(0).parameters()).dtype is torch.float64


def test_log_every_zero_is_refused_by_the_api_too() -> None:
    for key in ("log_every", "eval_every"):
        with pytest.raises(ValueError, match=f"{key}=0: must be a positive integer"):
            run_comparison(TASK, ["sgd"], steps=4, seeds=[0], hpo="none", **{key: 0})


def test_out_that_cannot_be_written_is_refused_before_any_training(
    tmp_path, capsys, unwritable_out
) -> None:
    from meta_test.specs import register_spec

    register_spec("test-counting", _counting, replace=True)
    (tmp_path / "file").write_text("x")
    BUILDS["n"] = 0
    argv = _argv(tmp_path / "file" / "out")
    argv[argv.index("sgd")] = "test-counting"
    assert "lies under" in _fails(capsys, argv)
    argv[argv.index("--out") + 1] = str(unwritable_out)
    assert "cannot write in" in _fails(capsys, argv)
    assert BUILDS["n"] == 0  # nothing was built, let alone trained


def test_overwrite_never_deletes_an_input_or_a_meta_train_run(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pre = KroneckerPreconditioner.for_model(_tiny().make_model(0), "rank1")
    metaopt.save_preconditioner(pre, out / "learned.safetensors")
    before = snapshot(tmp_path)
    argv = _argv(out, "--overwrite")
    argv[argv.index("sgd")] = f"sgd,learned:{out / 'learned.safetensors'}"
    err = _fails(capsys, argv)
    assert "holds" in err and "an input of this run" in err and "choose another --out" in err
    # the same file not named as an input: still a learned preconditioner, still refused
    assert "learned.safetensors" in _fails(capsys, _argv(out, "--overwrite"))
    assert snapshot(tmp_path) == before
    (out / "learned.safetensors").unlink()
    (out / "run").mkdir()
    (out / "run" / "config.json").write_text('{"learner": "metamd", "outer_steps": 3}')
    assert "part of a meta_train run" in _fails(capsys, _argv(out, "--overwrite"))
    (out / "run" / "config.json").unlink()
    (out / "data").mkdir()
    assert "an input of this run" in _fails(
        capsys, _argv(out, "--overwrite", "--data-root", str(out / "data"))
    )
    assert (out / "data").is_dir()


def test_output_folders_keep_the_users_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        (tmp_path / "plain").mkdir()  # oracle: the mode mkdir gives under this umask
        for out in (tmp_path / "new", tmp_path / "old"):
            if out.name == "old":
                out.mkdir()
                (out / "stale.txt").write_text("x")
            assert main(_argv(out, "--overwrite")) == 0
            assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    finally:
        os.umask(old)


def test_import_registers_a_task_for_python_dash_m_meta_test(tmp_path) -> None:
    (tmp_path / "my_tasks.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "from torch import nn\nfrom torch.utils.data import TensorDataset\nimport tasks\n\n"
        "@tasks.register_task('plugin-only-task')\n"
        "def make():\n"
        "    x = torch.randn(48, 3, generator=torch.Generator().manual_seed(0))\n"
        "    d = TensorDataset(x, x.sum(1, keepdim=True))\n"
        "    return tasks.Task('plugin-only-task', lambda: nn.Linear(3, 1), F.mse_loss, 'mse',"
        " d, d, d, batch_size=16)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "meta_test", "--import", str(tmp_path / "my_tasks.py"),
            "--task", "plugin-only-task", "--optimizers", "sgd", "--steps", "5", "--seeds", "0",
            "--hpo", "none", "--out", str(tmp_path / "D"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "D" / "results.json").read_text())["task"] == "plugin-only-task"
