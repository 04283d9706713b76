"""The demo end to end at smoke size (slow: it meta-trains and runs the harness)."""

from __future__ import annotations

import json

import pytest

from meta_train.demo import COMPETITORS, main


@pytest.mark.slow
def test_quick_demo_writes_the_artefact_the_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "meta_test" / "results.json").read_text())
    assert results["task"] == "rotated-digits/75"
    learned = [s for s in results["optimizers"] if s.startswith("learned:")]
    assert len(learned) == 1 and set(COMPETITORS) <= set(results["optimizers"])
    assert (out / "meta_train" / "preconditioner.safetensors").exists()
    assert (out / "meta_test" / "report.md").exists()
    for spec in results["optimizers"]:
        assert f"| {spec} |" in printed
    assert main(["--quick", "--out", str(out)]) == 2  # refuses a non-empty out
