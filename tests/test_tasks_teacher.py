"""The teacher-regression family: held-out ids, determinism, anisotropic inputs."""

import pytest
import torch

import tasks
from tasks.teacher import HELD_OUT_FROM, TeacherRegression


def test_the_family_never_draws_a_held_out_id_and_ids_fix_everything():
    family = tasks.get_family("teacher-regression")
    gen = torch.Generator().manual_seed(0)
    ids = [family.sample(gen).info["task_id"] for _ in range(200)]
    assert max(ids) < HELD_OUT_FROM and len(set(ids)) > 190
    a, b = tasks.get_task("teacher-regression:1000003"), family.task(1_000_003)
    assert a.info["held_out"] and a.name == "teacher-regression:1000003"
    for split in ("train", "val", "test"):
        for x, y in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(a.train.tensors[0], family.task(1_000_004).train.tensors[0])


def test_inputs_have_the_drawn_anisotropic_covariance():
    family = TeacherRegression(dim=6, condition=100.0, n_train=20000, n_val=10, n_test=10)
    task = family.task(7)
    var = task.info["input_variances"].double()
    assert var.max() <= 1.0 and var.min() >= 1.0 / 100.0
    x = task.train.tensors[0].double()
    eig = torch.linalg.eigvalsh(x.T @ x / x.shape[0])  # the population covariance's spectrum
    torch.testing.assert_close(eig, var.sort().values, rtol=0.05, atol=2e-3)


def test_bad_options_and_ids_are_named():
    with pytest.raises(ValueError, match="condition=0.5: must be a number >= 1"):
        TeacherRegression(condition=0.5)
    with pytest.raises(ValueError, match="the id must be an integer"):
        tasks.get_task("teacher-regression:abc")
