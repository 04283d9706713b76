"""The CLI: config merge (defaults < TOML < flags), --help, outputs, and bad inputs that exit
with code 2 and one line while touching nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import meta_train_lsq  # registers learner "lsq-diag" and family "lsq-test"
import pytest
import torch

import metaopt
from meta_train.cli import build_parser, main
from meta_train.config import FIELDS, TrainConfig
from meta_train.metrics import read_metrics
from tests._cli import NO_GPU, snapshot

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--inner-steps", "5", "--inner-lr", "0.02", "--meta-lr", "0.05", "--no-progress"]


def test_help_documents_every_option_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in FIELDS:
        flag = {"options": "--option", "source_options": "--source-option"}.get(name)
        flag = flag or ("--no-progress" if name == "progress" else "--" + name.replace("_", "-"))
        assert flag in text, flag
    assert text.count("(default:") >= len(FIELDS) - 3  # --learner, --no-progress say it in words
    for expected in ("(default: 10)", "(default: 200)", "(default: 'cpu')", "(default: off)"):
        assert expected in text
    # the learner settings (and --preset) default to the learner's (its preset's) own values
    learner_settings = ("preset", "outer_steps", "tasks_per_step", "inner_steps", "inner_lr",
                        "meta_lr", "meta_optimizer", "engine", "rank")  # fmt: skip
    assert all(getattr(TrainConfig, name) is None for name in learner_settings)
    assert text.count("(default: the learner's own)") == len(learner_settings)
    for learner in ("metamd", "metasgd", "metacurvature", "apo"):
        assert learner in text


def test_toml_and_flags_merge_flags_win_and_config_json_is_written(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'learner = "lsq-diag"\nfamily = "lsq-test"\nouter-steps = 4\nseed = 3\n'
        "inner_lr = 0.01\ncheckpoint_every = 2\n"
        "[source_options]\ndim = 6\nn = 20\n"
    )
    out = tmp_path / "out"
    args = ["--config", str(cfg), "--out", str(out), "--seed", "5", "--no-progress"]
    assert main([*args, "--source-option", "n=24", "--inner-steps", "3"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["seed"] == 5 and written["outer_steps"] == 4 and written["inner_lr"] == 0.01
    assert written["inner_steps"] == 3 and written["checkpoint_every"] == 2
    assert written["source_options"] == {"dim": 6, "n": 24}
    assert written["meta_lr"] == TrainConfig.meta_lr  # untouched default
    assert written == {**TrainConfig(**{**written}).to_dict()}
    # the artefact: the config as metadata, the rule and the inner lr it was trained with,
    # and it deploys on a fresh model of the family
    meta = metaopt.read_metadata(out / "learned_optimizer.safetensors")
    assert meta["user"]["config"]["seed"] == 5
    assert meta["optimizer"]["rule"] == "sgd" and meta["optimizer"]["lr"] == 0.01
    model = torch.nn.Linear(6, 1, bias=False).double()
    learned = metaopt.load_learned_optimizer(out / "learned_optimizer.safetensors", model)
    assert learned.preconditioner.num_meta_parameters() == 6
    assert learned.build(model.named_parameters()).defaults["lr"] == 0.01
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("meta_objective", "hypergrad_norm", "seconds"):
        assert all(isinstance(r[key], float) for r in rows)
    assert all(r["skipped"] == 0 for r in rows)
    png = (out / "meta_objective.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _bad(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meta_train: error: ") and err.count("\n") == 1, err
    return err


BASE = ["--family", "lsq-test", *FAST]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--learner", "nope", *BASE], "learner='nope' is unknown"),
        (["--learner", "lsq-diag", "--suite", "no-such-suite", *FAST], "no-such-suite"),
        (["--learner", "lsq-diag", "--family", "no-such-family", *FAST], "no-such-family"),
        (["--learner", "lsq-diag", *BASE, "--holdout", "3"], "applies to --suite only"),
        (["--learner", "lsq-diag", *FAST], "exactly one of"),
        (["--learner", "lsq-diag", *BASE, "--outer-steps", "0"], "outer_steps=0"),
        (["--learner", "lsq-diag", *BASE, "--outer-steps", "x"], "invalid int value"),
        (["--learner", "lsq-diag", *BASE, "--meta-lr", "-1"], "meta_lr=-1.0"),
        (["--learner", "lsq-diag", *BASE, "--meta-optimizer", "lbfgs"], "meta_optimizer"),
        (["--learner", "lsq-diag", *BASE, "--option", "bogus=1"], "bogus"),
        (["--learner", "metamd", *BASE, "--option", "bogus=1"], "bogus"),
        (["--learner", "metamd", *BASE, "--engine", "magic"], "engine='magic'"),
        (["--learner", "lsq-diag", *BASE, "--frobnicate"], "unrecognized arguments"),
        (["--learner", "lsq-diag", *BASE, "--source-option", "colour=1"], "colour"),
        (["--learner", "apo", *BASE, "--option", "bogus=1"], "bogus"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    err = _bad(capsys, [*argv, "--out", str(out)])
    assert needle in err
    assert not out.exists()


def test_unknown_holdout_exits_2(tmp_path, capsys) -> None:
    # diverse-digits is registered on main; the holdout is checked before any file is read
    err = _bad(
        capsys,
        [
            "--learner",
            "metamd",
            "--suite",
            "diverse-digits",
            "--holdout",
            "99",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "holdout='99'" in err and not (tmp_path / "o").exists()


def test_bad_config_files_exit_2(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    common = ["--learner", "lsq-diag", *BASE, "--out", str(out)]
    assert "cannot be read" in _bad(capsys, [*common, "--config", str(tmp_path / "absent.toml")])
    assert "cannot be read" in _bad(capsys, [*common, "--config", str(tmp_path)])
    broken = tmp_path / "broken.toml"
    broken.write_text("outer_steps = = 3\n")
    assert "not valid TOML" in _bad(capsys, [*common, "--config", str(broken)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("outer_stpes = 3\n")
    assert "unknown key 'outer_stpes'" in _bad(capsys, [*common, "--config", str(unknown)])
    typed = tmp_path / "typed.toml"
    typed.write_text('outer_steps = "many"\n')
    assert "outer_steps='many'" in _bad(capsys, [*common, "--config", str(typed)])
    assert not out.exists()


def test_non_empty_out_needs_resume_and_resume_needs_the_same_run(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    run = ["--learner", "lsq-diag", *BASE, "--outer-steps", "3", "--out", str(out)]
    assert "is not empty" in _bad(capsys, run)
    assert "no checkpoint.safetensors" in _bad(capsys, [*run, "--resume"])
    assert snapshot(out) == {"keep.txt": b"precious"}
    done = tmp_path / "done"
    assert main(["--learner", "lsq-diag", *BASE, "--outer-steps", "3", "--out", str(done)]) == 0
    before = snapshot(done)
    again = ["--learner", "lsq-diag", *BASE, "--out", str(done)]
    assert "is not empty" in _bad(capsys, [*again, "--outer-steps", "3"])
    err = _bad(capsys, [*again, "--outer-steps", "5", "--seed", "9", "--resume"])
    assert "seed=0" in err and "seed=9" in err
    assert "exists and is not a directory" in _bad(
        capsys, [*again, "--out", str(done / "config.json")]
    )
    assert snapshot(done) == before
    # a longer run resumes from the finished one and extends it
    assert main([*again, "--outer-steps", "5", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(done / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_python_dash_m_exit_code_is_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meta_train",
            "--learner",
            "nope",
            "--family",
            "x",
            "--out",
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "learner='nope'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_apo_is_refused_under_torchrun(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any setup
    err = _bad(capsys, ["--learner", "apo", *BASE, "--out", str(tmp_path / "o")])
    assert "one process only" in err and not (tmp_path / "o").exists()


# --- strict values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "cudaXYZ"], "device='cudaXYZ': must be 'cpu', 'cuda' or 'cuda:N'"),
        (["--device", "gpu0"], "device='gpu0'"),
        pytest.param(["--device", "cuda"], "no CUDA GPU is visible", marks=NO_GPU),
        (["--outer-steps", "100000000000000000000"], "must be an integer in [1, 100000000]"),
        (["--outer-steps", "1e20"], "invalid int value: '1e20'"),
        (["--seed", "4294967296"], "seed=4294967296: must be an integer in [0, 4294967295]"),
        (["--dist-timeout", "0"], "dist_timeout=0.0: must be a positive finite number"),
        (["--dist-timeout", "inf"], "dist_timeout=inf"),
        (["--option", "a=1", "--option", "a=2"], "--option a: given twice"),
        (["--option", 'b={"x": 1}'], "is not a value; VALUE is TOML"),
        (["--source-option", "dim=many"], "dim='many': must be int"),
        (["--source-option", "dim=6.5"], "dim=6.5: must be int"),
        (["--source-option", "dtype=float128"], "dtype='float128': must be one of"),
        (["--import", "no_such_plugin_xyz"], "--import 'no_such_plugin_xyz': cannot be imported"),
    ],
)
def test_strictly_typed_values_exit_2(tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "out"
    err = _bad(capsys, ["--learner", "lsq-diag", *BASE, *extra, "--out", str(out)])
    assert needle in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("preconditioner_options={learn_scale = 'maybe'}", "learn_scale='maybe': must be"),
        ("preconditioner_options={learn_scale = 1}", "learn_scale=1: must be"),
    ],
)
def test_learner_options_of_the_wrong_type_exit_2(tmp_path, capsys, option, needle) -> None:
    out = tmp_path / "out"
    err = _bad(capsys, ["--learner", "metamd", *BASE, "--option", option, "--out", str(out)])
    assert needle in err and not out.exists()


@pytest.mark.parametrize(("text", "value"), [("False", None), ("false", False), ("true", True)])
def test_boolean_options_mean_what_they_say(tmp_path, capsys, text, value) -> None:
    out = tmp_path / "out"
    argv = ["--learner", "metamd", *BASE, "--outer-steps", "1", "--option",
            f"preconditioner_options={{rank = 1, learn_scale = {text}}}"]  # fmt: skip
    if value is None:  # Python's spelling is no TOML value inside a table: refused, not truthy
        err = _bad(capsys, [*argv, "--out", str(out)])
        assert "is not a value; VALUE is TOML: 3, 0.1, true/false" in err and not out.exists()
        return
    assert main([*argv, "--out", str(out)]) == 0
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["preconditioner_options"]["learn_scale"] is value
    meta = metaopt.read_metadata(out / "learned_optimizer.safetensors")
    assert meta["options"]["learn_scale"] is value
    assert meta["user"]["config"]["options"]["preconditioner_options"]["learn_scale"] is value


def test_toml_inline_tables_and_bare_words(tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["--learner", "metamd", *BASE, "--outer-steps", "1", "--engine", "es"]
    argv += ["--option", "engine_options={pairs = 3}", "--option", "preconditioner=diag"]
    argv += ["--option", "preconditioner_options={}"]
    assert main([*argv, "--out", str(out)]) == 0
    options = json.loads((out / "config.json").read_text())["options"]
    assert options == {"engine_options": {"pairs": 3}, "preconditioner": "diag",
                       "preconditioner_options": {}}  # fmt: skip


def test_toml_config_values_are_typed_too(tmp_path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('learner = "lsq-diag"\nfamily = "lsq-test"\nprogress = "no"\n')
    err = _bad(capsys, ["--config", str(cfg), "--out", str(tmp_path / "o")])
    assert "progress='no': must be true or false" in err


def test_out_under_a_regular_file_or_unwritable_exits_2(tmp_path, capsys, unwritable_out) -> None:
    (tmp_path / "file").write_text("x")
    err = _bad(capsys, ["--learner", "lsq-diag", *BASE, "--out", str(tmp_path / "file" / "o")])
    assert "lies under" in err and "a regular file" in err
    err = _bad(capsys, ["--learner", "lsq-diag", *BASE, "--out", str(unwritable_out)])
    assert "cannot write in" in err


def test_help_documents_the_option_syntax_resume_and_dist_timeout(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dist-timeout" in text and "(default: 300.0)" in text
    assert "VALUE is TOML: 3, 0.1, true/false" in text and "a bare word is a string" in text
    assert "killed before its first checkpoint" in text and "starts from scratch" in text
    assert "--inner-lr" in text.split("--resume", 1)[1] and "--import MODULE" in text


# --- --import --------------------------------------------------------------------------------
PLUGIN = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import tasks


class PluginRegression(tasks.TaskFamily):
    name = "plugin-regression"

    def __init__(self, dim: int = 3) -> None:
        self.dim = dim

    def sample(self, generator):
        x = torch.randn(32, self.dim, generator=generator)
        data = TensorDataset(x, x @ torch.randn(self.dim, 1, generator=generator))
        dim = self.dim
        return tasks.Task("plugin-regression", lambda: nn.Linear(dim, 1), F.mse_loss, "mse",
                          data, data, data, batch_size=16)


class PluginBroken(tasks.TaskFamily):
    def sample(self, generator):
        return 42


tasks.register_family("plugin-regression")(PluginRegression)
tasks.register_family("plugin-broken")(PluginBroken)


@tasks.register_task("plugin-task")
def plugin_task():
    return PluginRegression().sample(torch.Generator().manual_seed(0))
"""


def _plugin(tmp_path: Path) -> Path:
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    return tmp_path


def test_import_registers_a_family_for_python_dash_m_meta_train(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(_plugin(tmp_path))])
    argv = [sys.executable, "-m", "meta_train", "--import", "my_plugin", "--learner", "metasgd"]
    argv += ["--family", "plugin-regression", "--outer-steps", "1", "--tasks-per-step", "2"]
    argv += ["--inner-steps", "3", "--no-progress", "--out", str(tmp_path / "D")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = metaopt.read_metadata(tmp_path / "D" / "learned_optimizer.safetensors")
    assert meta["user"]["config"]["family"] == "plugin-regression"
    assert meta["layers"] == {"weight": [1, 3], "bias": [1, 1]}
    # without --import the family is unknown: one line, exit 2
    argv[3:5] = []
    argv[-1] = str(tmp_path / "E")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "family='plugin-regression' is unknown" in proc.stderr


def test_a_family_whose_sample_is_not_a_task_exits_2(tmp_path, capsys) -> None:
    plugin = _plugin(tmp_path) / "my_plugin.py"
    out = tmp_path / "out"
    argv = ["--import", str(plugin), "--learner", "metasgd", "--family", "plugin-broken"]
    err = _bad(capsys, [*argv, "--out", str(out)])
    assert err == (
        "meta_train: error: family='plugin-broken': task family 'family' (PluginBroken): "
        "sample() returned a int, not a tasks.Task\n"
    )
    assert not out.exists()


def test_the_test_learner_is_a_meta_learner() -> None:
    learner = meta_train_lsq.DiagLSQ(meta_train_lsq.LSQFamily())
    assert isinstance(learner, metaopt.MetaLearner)
    assert isinstance(meta_train_lsq.Wrapped(learner), metaopt.MetaLearner)


def test_the_online_domain_cycle_draws_each_visits_task_once() -> None:
    """``--learner apo`` on a family: one ``sample`` per domain visit, the first included."""
    from meta_train.online import DomainCycle

    draws: list[int] = []

    class Counted(meta_train_lsq.LSQFamily):
        def sample(self, generator):
            draws.append(generator.initial_seed())
            return super().sample(generator)

    cycle = DomainCycle.start(Counted(), seed=0, steps_per_domain=2)
    assert len(draws) == 1
    for _ in range(3):  # the third batch is the second visit's first
        next(cycle)
    assert len(draws) == 2 and draws[0] != draws[1]
