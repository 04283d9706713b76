"""Data plumbing for the torchvision-backed tasks: data root, dataset table, splits, transforms.

The files are parsed by torchvision's own dataset classes; this module only says where
each dataset lives, turns a missing or corrupted file into a ``ValueError`` that says how
to obtain it, carves a seeded validation split out of the training set, and applies
per-split transforms (augmentation on the training split only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "DATA_ENV",
    "SOURCES",
    "ClassSubset",
    "SplitView",
    "VisionConfig",
    "VisionSource",
    "load_split",
    "model_factory",
    "resolve_data_root",
    "split_indices",
    "stratified_split",
]

DATA_ENV = "METAOPT_DATA"
DEFAULT_DATA_ROOT = Path("~/.metaopt/data")

ModelSpec = str | Callable[..., nn.Module]


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """``data_root`` if given, else ``$METAOPT_DATA``, else ``~/.metaopt/data`` (user-expanded)."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(data_root).expanduser()


@dataclass(frozen=True)
class VisionSource:
    """Where one torchvision dataset lives and how its class is called.

    Attributes:
        name: registry name (``"mnist"``, ``"svhn"``, ...).
        cls: the torchvision dataset class.
        folder: sub-folder of the data root passed to ``cls`` as ``root`` (``""``: the data
            root itself, for classes that add their own sub-folder).
        files: the files ``cls`` reads, relative to ``root``; all must exist unless
            ``download`` is set.
        split_arg: ``"train"`` (``cls(root, train=bool)``) or ``"split"``
            (``cls(root, split="train"|"test")``).
        homepage: where the files come from, for the error message.
    """

    name: str
    cls: type[Dataset]
    folder: str
    files: tuple[str, ...]
    split_arg: str
    homepage: str

    def root(self, data_root: Path) -> Path:
        return data_root / self.folder if self.folder else data_root


def _idx(folder: str, prefix: str = "", labels: str = "labels-idx1-ubyte") -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{prefix}{split}-{kind}"
        for split in (("train", "test") if prefix else ("train", "t10k"))
        for kind in ("images-idx3-ubyte", labels)
    )


_CIFAR10_FILES = tuple(f"cifar-10-batches-py/{f}" for f in ("batches.meta", "test_batch")) + tuple(
    f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)
)

SOURCES: dict[str, VisionSource] = {
    s.name: s
    for s in (
        VisionSource(
            "mnist", torchvision.datasets.MNIST, "", _idx("MNIST"), "train",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        VisionSource(
            "qmnist", torchvision.datasets.QMNIST, "",
            _idx("QMNIST", "qmnist-", "labels-idx2-int"), "train",
            "https://github.com/facebookresearch/qmnist",
        ),
        VisionSource(
            "kmnist", torchvision.datasets.KMNIST, "", _idx("KMNIST"), "train",
            "https://github.com/rois-codh/kmnist",
        ),
        VisionSource(
            "fashion-mnist", torchvision.datasets.FashionMNIST, "", _idx("FashionMNIST"),
            "train", "https://github.com/zalandoresearch/fashion-mnist",
        ),
        VisionSource(
            "usps", torchvision.datasets.USPS, "USPS", ("usps.bz2", "usps.t.bz2"), "train",
            "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
        ),
        VisionSource(
            "svhn", torchvision.datasets.SVHN, "SVHN", ("train_32x32.mat", "test_32x32.mat"),
            "split", "http://ufldl.stanford.edu/housenumbers/",
        ),
        VisionSource(
            "cifar10", torchvision.datasets.CIFAR10, "", _CIFAR10_FILES, "train",
            "https://www.cs.toronto.edu/~kriz/cifar.html",
        ),
        VisionSource(
            "cifar100", torchvision.datasets.CIFAR100, "",
            tuple(f"cifar-100-python/{f}" for f in ("meta", "train", "test")), "train",
            "https://www.cs.toronto.edu/~kriz/cifar.html",
        ),
        VisionSource(
            "stl10", torchvision.datasets.STL10, "",
            tuple(
                f"stl10_binary/{f}"
                for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                          "unlabeled_X.bin")
            ),
            "split", "https://cs.stanford.edu/~acoates/stl10/",
        ),
    )
}  # fmt: skip


def load_split(
    source: VisionSource, data_root: Path, train: bool, download: bool = False
) -> Dataset:
    """``source.cls`` for the training or test split, returning untransformed PIL images.

    Raises:
        ValueError: without ``download``, when a file is missing (naming the dataset, the
            expected path and how to obtain the files) or fails torchvision's checksum.
    """
    root = source.root(data_root)
    if not download:
        missing = [f for f in source.files if not (root / f).is_file()]
        if missing:
            raise ValueError(
                f"dataset {source.name!r}: files not found under {str(root)!r} "
                f"(missing: {', '.join(missing)}); run with download=True on a machine with "
                f"a network, or copy the files from {source.homepage} to {str(root)!r} "
                f"(the data root is the data_root option, else ${DATA_ENV}, "
                f"else {DEFAULT_DATA_ROOT})"
            )
    if source.split_arg == "split":
        kwargs: dict[str, Any] = {"split": "train" if train else "test"}
    else:
        kwargs = {"train": train}
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        return source.cls(str(root), download=download, **kwargs)
    except RuntimeError as err:
        if download:
            raise
        raise ValueError(
            f"dataset {source.name!r}: the files under {str(root)!r} are present but torchvision "
            f"rejected them ({err}); they are corrupted or not the official release -- "
            f"run with download=True, or copy the files from {source.homepage} again"
        ) from err


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded ``(train, val)`` partition of ``range(n)``.

    ``round(val_fraction * n)`` indices (at least one) go to validation, drawn by
    ``torch.randperm(n)`` under a ``torch.Generator`` seeded with ``seed``; the rest (in
    increasing order) stay for training. Both parts are non-empty.
    """
    if n < 2:
        raise ValueError(f"n={n}: a train/validation split needs at least 2 examples")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val = sorted(perm[:n_val].tolist())
    train = sorted(perm[n_val:].tolist())
    return train, val


def stratified_split(
    targets: Sequence[int], indices: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """A fixed, seeded ``(kept, held_out)`` partition of ``indices``, class by class.

    Of the ``n_c`` indices of class ``c`` (label ``targets[i]``), ``round(fraction * n_c)``
    are held out, but at least one and at most ``n_c - 1`` when ``n_c >= 2`` (none when
    ``n_c == 1``), so every class with two or more examples appears on both sides. Classes
    are visited in increasing order with one ``torch.Generator`` seeded with ``seed``.
    """
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(targets[i]), []).append(int(i))
    generator = torch.Generator().manual_seed(int(seed))
    kept: list[int] = []
    held: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        n = len(members)
        k = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)
        perm = torch.randperm(n, generator=generator).tolist()
        held += [members[p] for p in perm[:k]]
        kept += [members[p] for p in perm[k:]]
    return sorted(kept), sorted(held)


class SplitView(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image (``indices=None``: all).

    ``base`` must yield ``(PIL image, int label)``; ``label_map`` (optional) relabels.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | None,
        transform: Callable[[Any], torch.Tensor],
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]
        self.transform = transform
        self.label_map = dict(label_map) if label_map is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        label = int(label)
        if self.label_map is not None:
            label = self.label_map[label]
        return self.transform(image), label


class ClassSubset(SplitView):
    """The examples of ``base`` whose label is in ``classes``, relabelled ``0..k-1``.

    ``classes[j]`` becomes label ``j``; ``targets`` are the base dataset's labels (so the
    images need not be read to select them).
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        targets: Sequence[int],
        classes: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
    ) -> None:
        label_map = {int(c): j for j, c in enumerate(classes)}
        keep = [i for i in indices if int(targets[i]) in label_map]
        super().__init__(base, keep, transform, label_map)


@dataclass
class VisionConfig:
    """Options shared by every torchvision-backed task.

    Attributes:
        data_root: folder holding the datasets (default ``$METAOPT_DATA``, else
            ``~/.metaopt/data``).
        download: let torchvision download missing files (needs a network).
        val_fraction: share of the training set held out for validation (default 0.1:
            6,000 of MNIST's 60,000, 5,000 of CIFAR's 50,000 as in APO appendix C.5).
        split_seed: seed of the train/validation partition (fixed, default 0).
        batch_size: default training batch size (default 128, APO appendix C.5).
        model: a name resolved by ``tasks.models.get_model(name, num_classes=k,
            **model_options)`` when the model is built, or a callable
            ``model(k, **model_options) -> nn.Module``.
        model_options: keyword arguments for the model.
        device, dtype: where models and batches live.
    """

    data_root: str | os.PathLike[str] | None = None
    download: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 128
    model: ModelSpec = "lenet"
    model_options: dict[str, Any] = field(default_factory=dict)
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r}: must lie in (0, 1)")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be a positive integer")
        if not (isinstance(self.model, str) or callable(self.model)):
            raise ValueError(
                f"model={self.model!r}: must be a model name or a callable "
                "(num_classes, **model_options) -> nn.Module"
            )
        if not isinstance(self.model_options, Mapping):
            raise ValueError(f"model_options={self.model_options!r}: must be a dict")
        self.device = torch.device(self.device)

    @property
    def root(self) -> Path:
        """The resolved data root (see ``resolve_data_root``)."""
        return resolve_data_root(self.data_root)


def model_factory(
    model: ModelSpec,
    num_classes: int,
    model_options: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
) -> Callable[[], nn.Module]:
    """A zero-argument model builder for ``Task.model_fn``.

    A string is looked up in ``tasks.models`` only when the model is built, so the data
    side never depends on which models exist. ``input_shape`` (one input's shape) is passed
    to ``get_model`` for named models, which fills in their geometry options from it.
    """
    options = dict(model_options or {})
    if isinstance(model, str):
        name = model
        geometry = {} if input_shape is None else {"input_shape": tuple(input_shape)}

        def build() -> nn.Module:
            from tasks.models import get_model

            return get_model(name, num_classes=num_classes, **geometry, **options)

        return build
    if callable(model):
        fn = model
        return lambda: fn(num_classes, **options)
    raise ValueError(f"model={model!r}: must be a model name or a callable")
