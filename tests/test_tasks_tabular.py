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


# --- UCI regression from CSV ----------------------------------------------------------------
def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([",".join(header)] if header else []) + [",".join(f"{v!r}" for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def linear_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    y = x @ torch.tensor([2.0, -0.5, 30.0], dtype=torch.float64) + 100
    return x, y


def test_uci_csv_is_standardised_with_training_statistics(tmp_path):
    x, y = linear_rows(200)
    ids = torch.arange(200, dtype=torch.float64)
    rows = torch.cat([ids[:, None], x, y[:, None]], 1).tolist()
    write_csv(tmp_path / "uci" / "slice.csv", ["patientId", "a", "b", "c", "reference"], rows)
    task = tasks.get_task("uci:slice", data_root=tmp_path)
    assert task.name == "uci:slice" and task.metric == "mse"
    assert task.info["columns"] == ["a", "b", "c"] and task.info["target"] == "reference"
    assert [len(task._split(s)) for s in ("train", "val", "test")] == [160, 20, 20]
    xt, yt = task.train.tensors
    assert xt.shape == (160, 3) and yt.shape == (160, 1)
    torch.testing.assert_close(
        xt.double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        xt.double().std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert abs(float(yt.mean())) < 1e-5 and float(yt.std(unbiased=False)) == pytest.approx(1, 1e-5)
    # the standardised data still satisfy the generating linear law on every split
    w = torch.tensor([2.0, -0.5, 30.0], dtype=torch.float64)
    for split in ("train", "val", "test"):
        xs, ys = task._split(split).tensors
        raw_x = xs.double() * task.info["feature_std"] + task.info["feature_mean"]
        raw_y = ys.double().squeeze(1) * task.info["target_std"] + task.info["target_mean"]
        torch.testing.assert_close(raw_y, raw_x @ w + 100, rtol=1e-5, atol=1e-3)
    model = task.make_model(0)
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [
        100,
        100,
        1,
    ]
    xb, yb = next(task.train_batches(0))
    task.loss(model(xb), yb).backward()


def test_uci_headerless_csv_target_last_and_environment(tmp_path, monkeypatch):
    x, y = linear_rows(50, seed=1)
    write_csv(tmp_path / "uci" / "toy.csv", None, torch.cat([x, y[:, None]], 1).tolist())
    monkeypatch.setenv("METAOPT_DATA", str(tmp_path))
    task = tasks.get_task("uci:toy", target_column=0)
    assert task.info["target"] == 0 and task.info["columns"] == [1, 2, 3]
    default = tasks.get_task("uci:toy")
    assert default.info["target"] == 3
    train = default.info["indices"]["train"]
    assert default.info["target_mean"] == pytest.approx(float(y[train].mean()), rel=1e-12)
    assert default.info["target_std"] == pytest.approx(float(y[train].std(unbiased=False)), 1e-12)
    assert default.info["target_mean"] != pytest.approx(float(y.mean()), rel=1e-9)


def test_uci_missing_file_names_dataset_path_and_source(tmp_path):
    expected = str(tmp_path / "uci" / "protein.csv")
    with pytest.raises(ValueError) as err:
        tasks.get_task("uci:protein", data_root=tmp_path)
    msg = str(err.value)
    assert "dataset 'uci:protein'" in msg and expected in msg
    assert "CASP.csv" in msg and "archive.ics.uci.edu" in msg and "METAOPT_DATA" in msg
    with pytest.raises(ValueError, match=r"'uci:mine'.*numeric CSV"):
        tasks.get_task("uci:mine", data_root=tmp_path)


def test_uci_bad_files_and_columns(tmp_path):
    (tmp_path / "uci").mkdir()
    (tmp_path / "uci" / "bad.csv").write_text("a,b\n1,2\n3,4\nx,5\n")
    with pytest.raises(ValueError, match=r"line 4: 'x' is not a number"):
        tasks.get_task("uci:bad", data_root=tmp_path)
    (tmp_path / "uci" / "ok.csv").write_text("a,b\n1,2\n3,4\n5,6\n7,9\n")
    with pytest.raises(ValueError, match=r"target_column='z': no such column; columns are \['a'"):
        tasks.get_task("uci:ok", data_root=tmp_path, target_column="z")
    with pytest.raises(ValueError, match="includes the target column"):
        tasks.get_task("uci:ok", data_root=tmp_path, drop_columns=["b"])


def test_unknown_options_are_value_errors_listing_the_options():
    with pytest.raises(
        ValueError, match=r"task 'wine': unknown option\(s\) \['colour'\]; .*'split_seed'"
    ):
        tasks.get_task("wine", colour=1)
    with pytest.raises(ValueError, match=r"suite 'rotated-digits': unknown option\(s\) \['foo'\]"):
        tasks.get_suite("rotated-digits", foo=1)
    with pytest.raises(ValueError, match=r"family 'meta-quadratics': unknown option\(s\) \['q'\]"):
        tasks.get_family("meta-quadratics", q=1)
    with pytest.raises(ValueError, match=r"task 'uci:x': unknown option\(s\) \['target'\]"):
        tasks.get_task("uci:x", target=1)
