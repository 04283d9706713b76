"""Digits, rotated digits and the sklearn tabular tasks, checked against sklearn's raw arrays."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine

import tasks
from tasks.tabular import ROTATION_DOMAINS


def _all(task: tasks.Task) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: task._split(s).tensors for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(d.target)


def test_digits_pixels_labels_and_stratified_disjoint_splits(raw_digits):
    images, labels = raw_digits
    task = tasks.get_task("digits")
    idx = task.info["indices"]
    parts = [set(idx[s]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 1797 and set.union(*parts) == set(range(1797))
    assert all(
        not (a & b) for a, b in ((parts[0], parts[1]), (parts[0], parts[2]), (parts[1], parts[2]))
    )
    assert [len(p) for p in parts] == [1259, 179, 359]  # 20 % test, then 10 % of all for val
    for split, (x, y) in _all(task).items():
        assert x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
        torch.testing.assert_close(x, images[idx[split]], rtol=0, atol=0)  # angle 0: identity
        assert torch.equal(y, labels[idx[split]])
        assert set(y.tolist()) == set(range(10))  # stratified: every class in every split
    assert task.metric == "accuracy" and task.num_classes == 10


def test_digits_resize_and_rotation_oracles(raw_digits):
    images, _ = raw_digits
    big = tasks.get_task("digits", image_size=28)
    x = big.train.tensors[0]
    assert x.shape[1:] == (1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    # a 90 degree rotation is an exact counter-clockwise quarter turn of the pixel grid
    turned = tasks.get_task("digits", angle=90.0)
    idx = turned.info["indices"]["train"]
    torch.testing.assert_close(
        turned.train.tensors[0], torch.rot90(images[idx], 1, (-2, -1)), rtol=0, atol=1e-6
    )


def test_rotated_digits_domains_share_one_partition_and_really_differ(raw_digits):
    images, labels = raw_digits
    suite = tasks.get_suite("rotated-digits")
    assert list(suite.domains) == ["0", "15", "30", "45", "60", "75"] == list(ROTATION_DOMAINS)
    domain_tasks = {d: suite.task(d) for d in suite.domains}
    ref = domain_tasks["0"]
    for d, task in domain_tasks.items():
        assert task.name == f"rotated-digits/{d}" and task.info["angle"] == float(d)
        assert task.info["indices"] == ref.info["indices"]
        for split in ("train", "val", "test"):
            assert torch.equal(task._split(split).tensors[1], ref._split(split).tensors[1])
    torch.testing.assert_close(
        ref.train.tensors[0], images[ref.info["indices"]["train"]], rtol=0, atol=0
    )
    xs = [domain_tasks[d].train.tensors[0] for d in suite.domains]
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            assert float((xs[i] - xs[j]).abs().mean()) > 0.02, (i, j)
    # larger rotation, larger change from the upright digits
    gaps = [float((x - xs[0]).abs().mean()) for x in xs[1:]]
    assert gaps == sorted(gaps)
    # leave-one-domain-out: five training tasks, none is the held-out one
    train_tasks = suite.meta_train_tasks("45")
    assert sorted(t.name for t in train_tasks) == sorted(
        f"rotated-digits/{d}" for d in suite.domains if d != "45"
    )
    held = suite.meta_test_task("45")
    held_test = set(held.info["indices"]["test"])
    for t in train_tasks:  # the held-out domain's test digits never appear in training
        assert not held_test & set(t.info["indices"]["train"])


def test_rotated_digits_errors():
    suite = tasks.get_suite("rotated-digits")
    with pytest.raises(ValueError, match=r"holdout='90' is not a domain.*\['0', '15'"):
        suite.meta_train_tasks("90")
    with pytest.raises(ValueError, match="angle=: set by the domain"):
        tasks.get_suite("rotated-digits", angle=10)
    with pytest.raises(ValueError, match="not an angle"):
        tasks.get_suite("rotated-digits", domains=["up"])
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        tasks.get_suite("rotated-digits", val_fraction=1.5)


def test_digits_determinism_and_training_step():
    task = tasks.get_task("digits")
    a, b, c = task.make_model(0), task.make_model(0), task.make_model(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    s1, s2 = task.train_batches(5), task.train_batches(5)
    for _ in range(12):  # 1259 // 128 = 9 batches per epoch: crosses an epoch
        (x1, y1), (x2, y2) = next(s1), next(s2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    stream = task.train_batches(0)
    before = task.evaluate(a, "val")["loss"]
    for _ in range(60):
        x, y = next(stream)
        opt.zero_grad()
        task.loss(a(x), y).backward()
        opt.step()
    after = task.evaluate(a, "val")
    assert after["loss"] < before and after["accuracy"] > 0.8


@pytest.mark.parametrize(
    ("name", "loader", "classes"),
    [("breast-cancer", load_breast_cancer, 2), ("wine", load_wine, 3)],
)
def test_tabular_classification_standardised_with_training_statistics(name, loader, classes):
    raw = loader()
    task = tasks.get_task(name)
    splits = _all(task)
    n = sum(len(y) for _, y in splits.values())
    assert n == raw.data.shape[0] and task.num_classes == classes
    x_train = splits["train"][0].double()
    torch.testing.assert_close(
        x_train.mean(0), torch.zeros(raw.data.shape[1], dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        x_train.std(0, unbiased=False),
        torch.ones(raw.data.shape[1], dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    # undoing the standardisation gives back sklearn's rows, each exactly once
    mean, std = task.info["feature_mean"], task.info["feature_std"]
    rows = torch.cat([x for x, _ in splits.values()]).double() * std + mean
    ys = torch.cat([y for _, y in splits.values()])
    order = torch.tensor(sorted(range(n), key=lambda i: rows[i].tolist()))
    ref = torch.tensor(raw.data)
    ref_order = torch.tensor(sorted(range(n), key=lambda i: ref[i].tolist()))
    torch.testing.assert_close(rows[order], ref[ref_order], rtol=1e-5, atol=1e-4)
    assert torch.equal(ys[order], torch.tensor(raw.target)[ref_order])
    for _, y in splits.values():
        assert set(y.tolist()) == set(range(classes))
    model = task.make_model(0)
    x, y = next(task.train_batches(0))
    task.loss(model(x), y).backward()


def test_diabetes_regression_targets_standardised():
    raw = load_diabetes()
    task = tasks.get_task("diabetes")
    assert task.metric == "mse" and task.num_classes is None
    y_train = task.train.tensors[1].double()
    assert y_train.shape[1] == 1
    assert abs(float(y_train.mean())) < 1e-5 and float(y_train.std(unbiased=False)) == (
        pytest.approx(1.0, abs=1e-5)
    )
    ys = torch.cat([t for _, t in _all(task).values()]).double().squeeze(1)
    ys = ys * task.info["target_std"] + task.info["target_mean"]
    torch.testing.assert_close(
        ys.sort().values, torch.tensor(raw.target).sort().values, rtol=1e-5, atol=1e-3
    )
    # training-split statistics, not whole-data ones
    assert task.info["target_mean"] != pytest.approx(float(raw.target.mean()), abs=1e-6)
    model = task.make_model(0)
    x, y = next(task.train_batches(0))
    out = model(x).detach()
    assert out.shape == y.shape
    loss = task.loss(out, y)
    assert float(loss) == pytest.approx(float(((out - y) ** 2).mean()), rel=1e-6)


def test_tabular_bad_split_fractions():
    with pytest.raises(ValueError, match=r"val_fraction=0.5 \+ test_fraction=0.6"):
        tasks.get_task("wine", val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(ValueError, match="test_fraction=0"):
        tasks.get_task("diabetes", test_fraction=0)
