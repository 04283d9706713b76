"""The results pages show what docs/results/ holds: their generated tables are current, and a
learned-optimizer result of experiments/held_out.py's shape is rendered whatever it holds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("results_pages", ROOT / "tools/results_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_results_pages_are_current():
    assert _generator().main(["--check"]) == 0, "run: python tools/results_pages.py"


def test_learned_results_render_every_file_row_and_optimizer(tmp_path, monkeypatch):
    gen = _generator()
    (tmp_path / "learned").mkdir()
    summary = {
        "source": "rotated-digits", "meta_train_flags": ["--preset", "metamd-paper"],
        "steps": 300, "seeds": "0,1,2",
        "rows": {
            "0": {"meta_train_seconds": 41.5, "optimizers": {
                "adam": {"auc_train_loss": 0.1234, "test_metric": 0.987,
                         "test_metric_name": "accuracy", "hparams": {"lr": 0.01}},
                "learned": {"auc_train_loss": 0.0987, "test_metric": 0.991,
                            "test_metric_name": "accuracy", "hparams": {"lr": 0.005}}}},
            "75": {"meta_train_seconds": None, "optimizers": {
                "adam": {"auc_train_loss": 0.2, "test_metric": 0.95,
                         "test_metric_name": "accuracy", "hparams": {"lr": 0.1}}}},
        },
    }  # fmt: skip
    (tmp_path / "learned" / "rd.json").write_text(json.dumps(summary))
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    text = gen.learned()
    assert "### rotated-digits: `rd.json`" in text and "`--preset metamd-paper`" in text
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("| held out | adam AUC"))
    assert head == ("| held out | adam AUC | learned AUC | adam test accuracy % "
                    "| learned test accuracy % | meta-train s |")  # fmt: skip
    assert "| 0 | 0.1234 | 0.0987 | 98.7 | 99.1 | 41.5 |" in lines
    assert "| 75 | 0.2 | — | 95 | — | — |" in lines  # a missing optimizer, an unknown time
    assert "| 0 | lr=0.01 | lr=0.005 |" in lines


def test_without_learned_results_the_page_says_how_to_make_them(tmp_path, monkeypatch):
    gen = _generator()
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    assert "experiments/held_out.py" in gen.learned()


def test_held_out_prints_its_summary_as_the_results_page_renders_it():
    """experiments/held_out.py's printed table is the page's: rows without a baseline (a run
    whose baselines were left out) render with a dash instead of failing."""
    spec = importlib.util.spec_from_file_location("held_out", ROOT / "experiments/held_out.py")
    held_out = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(held_out)
    summary = {
        "source": "meta-quadratics", "meta_train_flags": [], "steps": 50, "seeds": "0",
        "rows": {"q": {"meta_train_seconds": 2.0, "optimizers": {
            "learned": {"auc_train_loss": 0.5, "test_metric": 0.25,
                        "test_metric_name": "mse", "hparams": {"lr": 0.1}}}}},
    }  # fmt: skip
    lines = held_out.table(summary).splitlines()
    assert "| held out | learned AUC | learned test mse | meta-train s |" in lines
    assert "| q | 0.5 | 0.25 | 2 |" in lines
