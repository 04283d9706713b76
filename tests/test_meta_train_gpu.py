"""The pipeline on CUDA: MetaMD meta-trains on the GPU, checkpoints and resumes (needs CUDA)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from meta_train.cli import main
from meta_train.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_metamd_on_cuda_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    args = ["--learner", "metamd", "--suite", "rotated-digits", "--holdout", "75"]
    args += ["--device", "cuda", "--tasks-per-step", "2", "--inner-steps", "5"]
    args += ["--checkpoint-every", "2", "--no-progress"]
    assert main([*args, "--outer-steps", "4", "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--outer-steps", "2", "--out", str(tmp_path / "part")]) == 0
    assert main([*args, "--outer-steps", "4", "--out", str(tmp_path / "part"), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "learned_optimizer.safetensors"))
    b = load_file(str(tmp_path / "part" / "learned_optimizer.safetensors"))
    for k in a:  # CUDA kernels may differ in the last bits between runs
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == 4
