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

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--inner-steps", "5", "--inner-lr", "0.02", "--meta-lr", "0.05", "--no-progress"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


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
    assert _snapshot(out) == {"keep.txt": b"precious"}
    done = tmp_path / "done"
    assert main(["--learner", "lsq-diag", *BASE, "--outer-steps", "3", "--out", str(done)]) == 0
    before = _snapshot(done)
    again = ["--learner", "lsq-diag", *BASE, "--out", str(done)]
    assert "is not empty" in _bad(capsys, [*again, "--outer-steps", "3"])
    err = _bad(capsys, [*again, "--outer-steps", "5", "--seed", "9", "--resume"])
    assert "seed=0" in err and "seed=9" in err
    assert "exists and is not a directory" in _bad(
        capsys, [*again, "--out", str(done / "config.json")]
    )
    assert _snapshot(done) == before
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


def test_the_test_learner_is_a_meta_learner() -> None:
    learner = meta_train_lsq.DiagLSQ(meta_train_lsq.LSQFamily())
    assert isinstance(learner, metaopt.MetaLearner)
    assert isinstance(meta_train_lsq.Wrapped(learner), metaopt.MetaLearner)
