"""torchvision-backed tasks, read from tiny files written here in the real on-disk formats.

Formats (as torchvision 0.29 parses them):
* IDX (MNIST, KMNIST, FashionMNIST, QMNIST): big-endian magic ``0x00 0x00 type ndim``, one
  big-endian uint32 per dimension, then the data (uint8, or big-endian int32 for QMNIST's
  ``labels-idx2-int``), under ``<root>/<ClassName>/raw/``.
* USPS: bz2-compressed libsvm lines ``label 1:v1 ... 256:v256``, labels 1..10, values in
  [-1, 1].
* SVHN: MATLAB ``.mat`` with ``X`` (32 x 32 x 3 x N, uint8) and ``y`` (N x 1, 10 = digit 0).
* CIFAR: python pickles with ``data`` (N x 3072 uint8, R then G then B planes) and
  ``labels`` / ``fine_labels``, plus the label-name meta file.
* STL10: raw uint8 ``*_X.bin`` (N x 3 x 96 x 96, each plane stored column-major) and
  ``*_y.bin`` labels 1..10.
* ImageFolder: PNG files in one folder per class.

SVHN, CIFAR and STL10 check every file against the md5 of the official release, which a
tiny test file cannot match. Those tests load through a subclass whose only change is the
md5 table (set to the md5 of the files written here), so torchvision's own integrity check
and parser both run; the unmodified class is shown to reject the files with our ValueError.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch import nn

import tasks.vision  # noqa: F401  (registers the names)
import tasks.vision_data as vd
from tasks.registry import get_suite, get_task
from tasks.vision import DIGIT_DOMAINS, NORMALISATION
from tasks.vision_folder import IMAGENET_NORMALISATION

RNG = np.random.default_rng(0)
N_TRAIN, N_TEST = 10, 4


# --- writers for the real formats -----------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """IDX file: magic (0, 0, type code, ndim), big-endian uint32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist_like(root: Path, folder: str, qmnist: bool = False) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n).astype(np.uint8)
        if qmnist:
            full = RNG.integers(0, 1000, size=(n, 8)).astype(np.int32)
            full[:, 0] = labels
            (raw / f"qmnist-{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
            (raw / f"qmnist-{split}-labels-idx2-int").write_bytes(idx_bytes(full))
        else:
            stem = "train" if split == "train" else "t10k"
            (raw / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(images))
            (raw / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def write_usps(root: Path) -> dict[str, np.ndarray]:
    folder = root / "USPS"
    folder.mkdir(parents=True)
    out = {}
    for fname, split, n in (("usps.bz2", "train", N_TRAIN), ("usps.t.bz2", "test", N_TEST)):
        labels = RNG.integers(1, 11, size=n)  # 1..10 in the file
        ink = RNG.integers(0, 2, size=n) * 2.0 - 1.0  # each image constant -1 or +1
        lines = [
            f"{lab} " + " ".join(f"{j + 1}:{v:.6f}" for j in range(256))
            for lab, v in zip(labels, ink, strict=True)
        ]
        (folder / fname).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        out[f"{split}_labels"], out[f"{split}_ink"] = labels, ink
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_svhn(root: Path) -> dict[str, np.ndarray]:
    folder = root / "SVHN"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = np.empty((32, 32, 3, n), dtype=np.uint8)
        x[:, :, 0], x[:, :, 1], x[:, :, 2] = 200, 100, 50  # one colour everywhere
        y = RNG.integers(1, 11, size=(n, 1)).astype(np.uint8)  # 10 stands for digit 0
        y[0, 0] = 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        out[f"{split}_y"] = y[:, 0]
    return out


def write_cifar(root: Path, hundred: bool = False) -> dict[str, np.ndarray]:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    k = 100 if hundred else 10
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    per_batch = 2
    out: dict[str, list] = {"train_data": [], "train_labels": []}
    for name in train_names:
        data = RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, k, size=per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, key: labels}))
        out["train_data"].append(data)
        out["train_labels"] += labels
    data = RNG.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8)
    labels = RNG.integers(0, k, size=N_TEST).tolist()
    (folder / "test").write_bytes(pickle.dumps({"data": data, key: labels}))
    if not hundred:
        (folder / "test").rename(folder / "test_batch")
    meta_name, meta_key = (
        ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    )
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(k)]}))
    return {
        "train_data": np.concatenate(out["train_data"]),
        "train_labels": np.array(out["train_labels"]),
        "test_data": data,
        "test_labels": np.array(labels),
    }


def write_stl10(root: Path) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", 6), ("test", 3), ("unlabeled", 1)):
        images = RNG.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # [c, row, col]
        # STL10 stores each plane column-major, i.e. as [c, col, row] in C order.
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        out[f"{split}_images"] = images
        if split != "unlabeled":
            labels = RNG.integers(1, 11, size=n).astype(np.uint8)
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
            out[f"{split}_labels"] = labels
    return out


def with_md5s_of_written_files(name: str, root: Path) -> type:
    """The torchvision class of ``name`` with its md5 table set to the files under ``root``."""
    cls = vd.SOURCES[name].cls
    base = vd.SOURCES[name].root(root)
    if name == "svhn":
        table = {
            s: [u, f, md5(base / f)] for s, (u, f, _) in cls.split_list.items() if s != "extra"
        }
        return type("SVHNWrittenMD5", (cls,), {"split_list": table})
    folder = base / cls.base_folder
    attrs = {
        "train_list": [[f, md5(folder / f)] for f, _ in cls.train_list],
        "test_list": [[f, md5(folder / f)] for f, _ in cls.test_list],
    }
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": md5(folder / cls.meta["filename"])}
    return type(f"{cls.__name__}WrittenMD5", (cls,), attrs)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vision_data")
    written = {
        "mnist": write_mnist_like(root, "MNIST"),
        "kmnist": write_mnist_like(root, "KMNIST"),
        "fashion-mnist": write_mnist_like(root, "FashionMNIST"),
        "qmnist": write_mnist_like(root, "QMNIST", qmnist=True),
        "usps": write_usps(root),
        "svhn": write_svhn(root),
        "cifar10": write_cifar(root),
        "cifar100": write_cifar(root, hundred=True),
        "stl10": write_stl10(root),
    }
    return {"root": root, **written}


@pytest.fixture
def checked(data: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SVHN, CIFAR and STL10 sources whose md5 tables match the files written here."""
    for name in ("svhn", "cifar10", "cifar100", "stl10"):
        cls = with_md5s_of_written_files(name, data["root"])
        monkeypatch.setitem(vd.SOURCES, name, dataclasses.replace(vd.SOURCES[name], cls=cls))
    return data["root"]


def tiny_model(num_classes: int, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * in_channels, num_classes)
    )


def all_items(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


# --- the format writers themselves ----------------------------------------------------------
def test_idx_writer_uses_the_published_magic_numbers() -> None:
    images = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    labels = idx_bytes(np.zeros(2, np.uint8))
    assert int.from_bytes(images[:4], "big") == 2051  # MNIST images magic
    assert int.from_bytes(labels[:4], "big") == 2049  # MNIST labels magic
    assert int.from_bytes(images[4:8], "big") == 2 and len(images) == 16 + 2 * 784


# --- digits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion-mnist", "qmnist"])
def test_mnist_family_pixels_labels_and_splits(data: dict, name: str) -> None:
    task = get_task(name, data_root=data["root"], model=tiny_model)
    w = data[name]
    x, y = all_items(task.test)
    assert x.shape == (N_TEST, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.from_numpy(w["test_images"]).float() / 255)
    assert y.tolist() == w["test_labels"].tolist()
    # validation = round(0.1 * 10) = 1 training example; train and val partition the file
    assert (len(task.train), len(task.val)) == (N_TRAIN - 1, 1)
    assert sorted(task.train.indices + task.val.indices) == list(range(N_TRAIN))
    xt, yt = all_items(task.train)
    idx = torch.tensor(task.train.indices)
    torch.testing.assert_close(xt[:, 0], torch.from_numpy(w["train_images"])[idx].float() / 255)
    assert yt.tolist() == w["train_labels"][idx.numpy()].tolist()
    assert task.num_classes == 10 and task.metric == "accuracy"


def test_usps_is_resized_to_28_and_relabelled_from_one_based(data: dict) -> None:
    task = get_task("usps", data_root=data["root"], model=tiny_model)
    x, y = all_items(task.test)
    assert x.shape == (N_TEST, 1, 28, 28)
    assert y.tolist() == (data["usps"]["test_labels"] - 1).tolist()
    # torchvision maps v in [-1, 1] to (v + 1) / 2 * 255; constant images stay constant
    expected = torch.tensor((data["usps"]["test_ink"] + 1) / 2, dtype=torch.float32)
    torch.testing.assert_close(x.amin((1, 2, 3)), expected)
    torch.testing.assert_close(x.amax((1, 2, 3)), expected)


def test_svhn_is_greyscale_28_with_digit_zero_as_label_zero(checked: Path, data: dict) -> None:
    task = get_task("svhn", data_root=checked, model=tiny_model)
    x, y = all_items(task.test)
    assert x.shape == (N_TEST, 1, 28, 28)
    expected = data["svhn"]["test_y"] % 10
    assert y.tolist() == expected.tolist() and y[0] == 0
    # ITU-R 601-2 luma of RGB (200, 100, 50), as PIL's "L" conversion computes it
    luma = (200 * 19595 + 100 * 38470 + 50 * 7471 + 0x8000) >> 16
    assert luma == 124
    torch.testing.assert_close(x, torch.full_like(x, luma / 255))


def test_svhn_with_the_official_md5s_rejects_other_files(data: dict) -> None:
    with pytest.raises(ValueError, match=r"dataset 'svhn'.*rejected.*download=True"):
        get_task("svhn", data_root=data["root"])


def test_diverse_digits_has_six_domains_with_disjoint_leave_one_out(checked: Path) -> None:
    suite = get_suite("diverse-digits", data_root=checked, model=tiny_model, batch_size=4)
    assert tuple(suite.domains) == DIGIT_DOMAINS and len(suite.domains) == 6
    for holdout in suite.domains:
        train_names = [t.name for t in suite.meta_train_tasks(holdout)]
        test_name = suite.meta_test_task(holdout).name
        assert len(train_names) == 5 and test_name == holdout
        assert holdout not in train_names
        assert sorted([*train_names, test_name]) == sorted(DIGIT_DOMAINS)
    for domain in suite.domains:
        x, y = next(suite.task(domain).train_batches(seed=0))
        assert x.shape == (4, 1, 28, 28) and int(y.min()) >= 0 and int(y.max()) <= 9
    gen = torch.Generator().manual_seed(0)
    drawn = {suite.sample_task(gen, holdout="svhn").name for _ in range(30)}
    assert "svhn" not in drawn and len(drawn) > 1


def test_digit_task_trains_and_evaluates_end_to_end(data: dict) -> None:
    task = get_task("mnist", data_root=data["root"], model=tiny_model, batch_size=3)
    a, b = task.make_model(seed=1), task.make_model(seed=1)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    s1, s2 = task.train_batches(seed=5), task.train_batches(seed=5)
    for _ in range(4):
        (x1, y1), (x2, y2) = next(s1), next(s2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    task.loss(a(x1), y1).backward()
    assert all(p.grad is not None for p in a.parameters())
    result = task.evaluate(a, "val")
    assert set(result) == {"loss", "accuracy"} and 0.0 <= result["accuracy"] <= 1.0


# --- colour images: augmentation and normalisation -----------------------------------------
def normalised(images_chw: np.ndarray, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALISATION[name])
    return (torch.from_numpy(images_chw).float() / 255 - mean) / std


def augmented_candidates(raw_chw: np.ndarray, name: str, pad: int) -> torch.Tensor:
    """All ``(2 pad + 1)^2 x 2`` crop/flip results of a raw uint8 C x H x W image."""
    c, h, w = raw_chw.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), np.uint8)
    padded[:, pad : pad + h, pad : pad + w] = raw_chw
    out = []
    for i in range(2 * pad + 1):
        for j in range(2 * pad + 1):
            crop = padded[:, i : i + h, j : j + w]
            out += [crop, crop[:, :, ::-1]]
    return normalised(np.ascontiguousarray(np.stack(out)), name)


def test_cifar10_eval_is_normalised_and_train_is_augmented(checked: Path, data: dict) -> None:
    task = get_task(
        "cifar10", data_root=checked, model=tiny_model, model_options={"in_channels": 3}
    )
    w = data["cifar10"]
    test_raw = w["test_data"].reshape(-1, 3, 32, 32)
    x, y = all_items(task.test)
    assert x.shape == (N_TEST, 3, 32, 32) and y.tolist() == w["test_labels"].tolist()
    torch.testing.assert_close(x, normalised(test_raw, "cifar10"))
    train_raw = w["train_data"].reshape(-1, 3, 32, 32)
    assert (len(task.train), len(task.val)) == (9, 1)  # 5 batches of 2, 10% held out
    (vi,) = task.val.indices
    torch.testing.assert_close(task.val[0][0], normalised(train_raw[vi : vi + 1], "cifar10")[0])
    assert torch.equal(task.val[0][0], task.val[0][0])  # no randomness off the training split
    # training views: each is one of the 162 crop/flip candidates, and they vary
    ti = task.train.indices[0]
    candidates = augmented_candidates(train_raw[ti], "cifar10", pad=4)
    torch.manual_seed(0)
    views = [task.train[0][0] for _ in range(12)]
    for v in views:
        assert v.shape == (3, 32, 32)
        assert torch.isclose(candidates, v, atol=1e-6).flatten(1).all(1).any()
    assert len({v.numpy().tobytes() for v in views}) > 1
    assert task.train[0][1] == int(w["train_labels"][ti])


def test_cifar10_without_augmentation_matches_eval(checked: Path, data: dict) -> None:
    task = get_task("cifar10", data_root=checked, augment=False, model=tiny_model)
    raw = data["cifar10"]["train_data"].reshape(-1, 3, 32, 32)
    ti = task.train.indices[0]
    torch.testing.assert_close(task.train[0][0], normalised(raw[ti : ti + 1], "cifar10")[0])


def test_cifar100_uses_fine_labels(checked: Path, data: dict) -> None:
    task = get_task("cifar100", data_root=checked, model=tiny_model)
    x, y = all_items(task.test)
    assert task.num_classes == 100 and x.shape == (N_TEST, 3, 32, 32)
    assert y.tolist() == data["cifar100"]["test_labels"].tolist()
    torch.testing.assert_close(
        x, normalised(data["cifar100"]["test_data"].reshape(-1, 3, 32, 32), "cifar100")
    )


def test_stl10_binary_orientation_labels_and_resize(checked: Path, data: dict) -> None:
    task = get_task("stl10", data_root=checked, model=tiny_model)
    x, y = all_items(task.test)
    assert x.shape == (3, 3, 96, 96)
    assert y.tolist() == (data["stl10"]["test_labels"] - 1).tolist()
    torch.testing.assert_close(x, normalised(data["stl10"]["test_images"], "stl10"))
    small = get_task("stl10", data_root=checked, image_size=32, model=tiny_model)
    assert small.test[0][0].shape == (3, 32, 32) and small.train[0][0].shape == (3, 32, 32)
    assert small.info["augmentation"].startswith("random crop 32 with zero padding 4")


def test_cifar_with_the_official_md5s_rejects_other_files(data: dict) -> None:
    with pytest.raises(ValueError, match=r"dataset 'cifar10'.*rejected"):
        get_task("cifar10", data_root=data["root"])


# --- missing files, data root and options --------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "qmnist", "usps", "svhn", "cifar10", "stl10"])
def test_missing_files_name_the_dataset_path_and_remedy(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError) as err:
        get_task(name, data_root=tmp_path)
    msg = str(err.value)
    assert f"dataset {name!r}" in msg and str(tmp_path) in msg
    assert "download=True" in msg and "copy the files" in msg
    assert vd.SOURCES[name].files[0] in msg


def test_data_root_option_then_environment_then_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_DATA", "/env/data")
    assert vd.resolve_data_root("/opt/x") == Path("/opt/x")
    assert vd.resolve_data_root(None) == Path("/env/data")
    monkeypatch.delenv("METAOPT_DATA")
    assert vd.resolve_data_root(None) == Path.home() / ".metaopt" / "data"


def test_environment_variable_locates_the_files(
    data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAOPT_DATA", str(data["root"]))
    assert len(get_task("kmnist", model=tiny_model).test) == N_TEST


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"model": 3}, "model"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options_raise_naming_the_field(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        get_task("mnist", **options)


def test_split_indices_are_fixed_disjoint_and_cover() -> None:
    tr, va = vd.split_indices(50_000, 0.1, seed=0)
    assert len(va) == 5_000 and len(tr) == 45_000  # APO appendix C.5: 5k held out
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == 50_000
    assert vd.split_indices(50_000, 0.1, seed=0)[1] == va
    assert vd.split_indices(50_000, 0.1, seed=1)[1] != va


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    targets = [0] * 10 + [1] * 2 + [2] * 1
    kept, held = vd.stratified_split(targets, range(13), 0.2, seed=0)
    assert sorted(kept + held) == list(range(13)) and not set(kept) & set(held)
    held_per_class = [sum(targets[i] == c for i in held) for c in range(3)]
    assert held_per_class == [2, 1, 0]  # round(0.2*10) = 2; 2 -> at least 1; 1 -> none
    assert {targets[i] for i in kept} == {0, 1, 2}
    assert vd.stratified_split(targets, range(13), 0.2, seed=0) == (kept, held)


# --- ImageFolder suite ----------------------------------------------------------------------
def colour_of(c: int) -> tuple[int, int, int]:
    """A distinct colour per original class index, decodable after normalisation."""
    return (20 * c + 10, 255 - 20 * c, 128)


def write_image_folders(root: Path) -> None:
    """``a`` with its own train/test split; ``b`` and ``c`` as single folders."""
    for domain, n_classes in (("a", 6), ("b", 5), ("c", 4)):
        for c in range(n_classes):
            splits = (("train", 4), ("test", 2)) if domain == "a" else (("", 5),)
            for split, n in splits:
                folder = root / domain / split / f"class{c:02d}"
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.new("RGB", (12 + i, 10), colour_of(c)).save(folder / f"{i}.png")


def decode_class(x: torch.Tensor) -> int:
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_NORMALISATION)
    rgb = ((x * std + mean) * 255).mean((1, 2)).round()
    return int((rgb[0] - 10) / 20)


def test_imagefolder_samples_k_relabelled_classes(tmp_path: Path) -> None:
    write_image_folders(tmp_path)
    suite = get_suite("imagefolder", root=tmp_path, num_classes=3, model=tiny_model, batch_size=4)
    assert suite.domains == ("a", "b", "c")
    task = suite.sample_task(torch.Generator().manual_seed(0), holdout="c")
    assert task.num_classes == 3 and task.name in ("imagefolder/a", "imagefolder/b")
    chosen = task.info["class_indices"]
    assert len(chosen) == 3 and chosen == sorted(chosen)
    for split in ("train", "val", "test"):
        x, y = all_items(getattr(task, split))
        assert x.shape[1:] == (3, 224, 224)
        assert set(y.tolist()) <= {0, 1, 2}
        for xi, yi in zip(x, y, strict=True):  # label j holds images of original class chosen[j]
            assert decode_class(xi) == chosen[int(yi)]
    assert {int(t) for t in all_items(task.train)[1]} == {0, 1, 2}
    # two generators, same single domain: different class subsets
    only_a = get_suite("imagefolder", root=tmp_path, num_classes=3, domains=["a"], model=tiny_model)
    first, second = (
        only_a.sample_task(torch.Generator().manual_seed(s)).info["class_indices"] for s in (0, 1)
    )
    assert first != second
    assert [only_a.sample_task(torch.Generator().manual_seed(s)).name for s in (0, 1)] == [
        "imagefolder/a"
    ] * 2
    draws = {
        (t.name, tuple(t.info["class_indices"]))
        for t in (suite.sample_task(torch.Generator().manual_seed(s)) for s in range(6))
    }
    assert len({name for name, _ in draws}) > 1
    again = suite.sample_task(torch.Generator().manual_seed(0), holdout="c")
    assert (again.name, again.info["class_indices"]) == (task.name, chosen)
    for s in range(10):
        assert (
            suite.sample_task(torch.Generator().manual_seed(s), holdout="a").name != "imagefolder/a"
        )


def test_imagefolder_splits_and_full_domain_tasks(tmp_path: Path) -> None:
    write_image_folders(tmp_path)
    suite = get_suite("imagefolder", root=tmp_path, num_classes=3, image_size=16, model=tiny_model)
    # official split: per class 4 train images, of which round(0.4) -> at least 1 is val
    a = suite.task("a")
    assert a.num_classes == 6 and a.info["sizes"] == {"train": 18, "val": 6, "test": 12}
    # 5 classes x 5 images: round(0.2 * 5) = 1 test per class, then 1 of 4 for validation
    b = suite.task("b")
    assert b.info["sizes"] == {"train": 15, "val": 5, "test": 5}
    assert not set(b.train.indices) & set(b.test.indices)
    assert not set(b.val.indices) & set(b.test.indices) | (
        set(b.val.indices) & set(b.train.indices)
    )
    assert b.train[0][0].shape == (3, 16, 16)
    names = {t.name for t in suite.meta_train_tasks("b")}
    assert names == {"imagefolder/a", "imagefolder/c"}
    with pytest.raises(ValueError, match="num_classes=5.*'c' has only 4"):
        get_suite("imagefolder", root=tmp_path, num_classes=5, domains=["c"]).sample_task(
            torch.Generator()
        )


def test_imagefolder_missing_root_and_domain(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset 'imagefolder'.*does not exist"):
        get_suite("imagefolder", root=tmp_path / "nope")
    write_image_folders(tmp_path)
    with pytest.raises(ValueError, match="domains: 'zzz'"):
        get_suite("imagefolder", root=tmp_path, domains=["a", "zzz"])
