"""Tasks derived from other tasks, on MNIST IDX files written here: ``autoencoder:<name>``
(targets are the flattened inputs, Bernoulli loss by hand) and ``rotated-mnist``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tasks


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic ``0 0 0x08 ndim`` (uint8 data), big-endian uint32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_mnist(root: Path) -> np.ndarray:
    """20 training images (random pixels), the test split a different 6."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    for split, images in (("train", train), ("t10k", test)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        labels = (np.arange(len(images)) % 10).astype(np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return train


def test_digits_reconstruction_loss_and_metric_by_hand():
    task = tasks.get_task("autoencoder:digits", image_size=28)
    assert task.name == "autoencoder:digits" and task.metric == "mse"
    assert task.batch_size == 512  # APO appendix C.4
    model = task.make_model(0)
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1000, 500, 250, 30, 250, 500, 1000, 784]
    x, y = next(task.train_batches(0, batch_size=32))
    assert torch.equal(y, x.reshape(32, -1))
    logits = model(x)
    p = torch.sigmoid(logits.detach().double())
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1).mean()
    loss = task.loss(logits, y)
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    loss.backward()
    xs, ys = task.test.tensors
    with torch.no_grad():
        mse = (torch.sigmoid(model(xs).double()) - ys.double()).pow(2).mean()
    assert task.evaluate(model)["mse"] == pytest.approx(float(mse), rel=1e-6)


def test_mnist_files_reconstruction(tmp_path: Path):
    train = write_mnist(tmp_path)
    task = tasks.get_task("autoencoder:mnist", data_root=tmp_path)
    x, y = next(task.train_batches(0, batch_size=4))
    assert x.shape == (4, 1, 28, 28) and y.shape == (4, 784)
    torch.testing.assert_close(y, x.reshape(4, -1))
    pixels = torch.tensor(train.reshape(20, -1), dtype=torch.float32) / 255
    for row in y:  # each target is one of the written images, scaled to [0, 1]
        assert bool(((pixels - row).abs().max(1).values < 1e-6).any())
    model = task.make_model(0)
    task.loss(model(x), y).backward()


def test_inputs_outside_unit_interval_are_refused():
    with pytest.raises(ValueError, match=r"task 'breast-cancer': inputs span .*in \[0, 1\]"):
        tasks.get_task("autoencoder:breast-cancer")
    with pytest.raises(ValueError, match="nested"):
        tasks.get_task("autoencoder:autoencoder:digits")


# --- rotated MNIST --------------------------------------------------------------------------
def _items(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_rotated_mnist_domains(tmp_path: Path):
    train = write_mnist(tmp_path)
    suite = tasks.get_suite("rotated-mnist", data_root=tmp_path, val_fraction=0.25)
    assert list(suite.domains) == ["0", "15", "30", "45", "60", "75"]
    upright = tasks.get_task("mnist", data_root=tmp_path, val_fraction=0.25)
    pixels = torch.tensor(train, dtype=torch.float32).unsqueeze(1) / 255
    by_domain = {}
    for d in suite.domains:
        task = suite.task(d)
        assert task.name == f"rotated-mnist/{d}" and task.info["angle"] == float(d)
        assert [len(task.train), len(task.val), len(task.test)] == [15, 5, 6]
        by_domain[d] = {s: _items(task._split(s)) for s in ("train", "val", "test")}
        for s in ("train", "val", "test"):  # same images and labels in every domain
            assert torch.equal(by_domain[d][s][1], _items(upright._split(s))[1])
    x0 = by_domain["0"]["train"][0]
    torch.testing.assert_close(x0, _items(upright.train)[0], rtol=0, atol=0)  # 0: identity
    assert all(bool((pixels - x).abs().amax((1, 2, 3)).min() == 0) for x in x0)
    for a in suite.domains:
        for b in suite.domains:
            if a < b:
                diff = (by_domain[a]["train"][0] - by_domain[b]["train"][0]).abs().mean()
                assert float(diff) > 0.02, (a, b)
    quarter = tasks.get_suite("rotated-mnist", data_root=tmp_path, domains=["90"]).task("90")
    torch.testing.assert_close(
        _items(quarter.test)[0],
        torch.rot90(_items(upright.test)[0], 1, (-2, -1)),
        rtol=0,
        atol=1e-5,  # bilinear resampling rounds to a few 1e-6 at 28 x 28
    )
    held = suite.meta_test_task("30")
    assert len(suite.meta_train_tasks("30")) == 5
    model = held.make_model(0)  # metamd-mlp, 784 inputs from the task's input shape
    x, y = next(held.train_batches(0, batch_size=4))
    held.loss(model(x), y).backward()


def test_rotated_mnist_options_and_missing_files(tmp_path: Path):
    with pytest.raises(ValueError, match=r"suite 'rotated-mnist': unknown option\(s\) \['angle'\]"):
        tasks.get_suite("rotated-mnist", angle=3)
    with pytest.raises(ValueError, match="not an angle"):
        tasks.get_suite("rotated-mnist", domains=["left"])
    suite = tasks.get_suite("rotated-mnist", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"dataset 'mnist': files not found"):
        suite.task("15")
