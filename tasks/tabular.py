"""Tasks on scikit-learn's bundled data files (no download): digits, rotated digits, tabular.

Registered names:

* task ``"digits"``: the 1,797 8x8 handwritten digits of ``sklearn.datasets.load_digits``
  as ``1 x s x s`` tensors in ``[0, 1]`` (pixel / 16; ``image_size=s``, default 8, resizes
  bilinearly with antialiasing), 10 classes; ``angle`` rotates every image.
* suite ``"rotated-digits"``: MetaMD's RotatedMNIST protocol on this data -- six domains
  ``"0"``, ``"15"``, ``"30"``, ``"45"``, ``"60"``, ``"75"``, each the digits rotated by that
  many degrees counter-clockwise (``torchvision.transforms.functional.rotate``, bilinear,
  zero fill, after the resize). Every domain uses the SAME seeded train/val/test partition
  of the 1,797 base images, so a held-out domain's test digits never appear, in any
  rotation, in any domain's training split.
* tasks ``"breast-cancer"`` (569 x 30, 2 classes) and ``"wine"`` (178 x 13, 3 classes):
  classification, features standardised with training-split statistics.
* task ``"diabetes"`` (442 x 10): regression, inputs and target standardised with training
  statistics (``task.info["target_mean"]``, ``["target_std"]`` undo it).

Splits are fixed by ``split_seed`` (default 0): ``test_fraction`` (0.2) then
``val_fraction`` (0.1) of the examples, stratified by class for classification
(``tasks.vision_data.stratified_split``). Default models: ``"metamd-mlp"`` for the digits,
``"mlp"`` with ``widths=(100, 100)`` for the tabular sets; any ``tasks.models`` name works
(its input geometry is filled in), e.g. ``model="lenet"``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset
from torchvision.transforms import functional as TF

from tasks.base import Task, TaskSuite
from tasks.registry import register_suite, register_task
from tasks.rotated import ROTATION_DOMAINS, check_angles, rotate_images
from tasks.synthetic import squared_error, storage_dtype, with_defaults
from tasks.vision_data import model_factory, stratified_split

__all__ = [
    "ROTATION_DOMAINS",
    "RotatedDigits",
    "digit_images",
    "digits",
    "random_split",
    "split_three",
    "standardise",
    "tensor_task",
]

TABULAR_MODEL = {"mlp": {"widths": (100, 100)}}


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name}={value!r}: must lie in (0, 1)")
    return float(value)


def split_three(
    n: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    targets: Sequence[int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """A fixed seeded ``(train, val, test)`` partition of ``range(n)`` (sorted indices).

    ``test_fraction`` of the examples go to test, then ``val_fraction`` (of all ``n``) to
    validation; class-stratified when ``targets`` are given, else uniformly random.
    """
    val_fraction = _fraction("val_fraction", val_fraction)
    test_fraction = _fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction}: must be below 1"
        )
    if targets is None:
        return random_split(n, val_fraction, test_fraction, seed)
    rest, test = stratified_split(targets, range(n), test_fraction, seed)
    train, val = stratified_split(targets, rest, val_fraction / (1 - test_fraction), seed + 1)
    return train, val, test


def random_split(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Uniformly random ``(train, val, test)`` partition (each part at least one index)."""
    if n < 3:
        raise ValueError(f"n={n}: a train/val/test split needs at least 3 examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_test = min(max(1, round(test_fraction * n)), n - 2)
    n_val = min(max(1, round(val_fraction * n)), n - n_test - 1)
    test, val = perm[:n_test], perm[n_test : n_test + n_val]
    return sorted(perm[n_test + n_val :]), sorted(val), sorted(test)


def standardise(x: Tensor, train_idx: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - mean) / std`` with the mean/std of ``x[train_idx]`` (columns with zero spread
    keep ``std = 1``); returns ``(standardised, mean, std)``."""
    ref = x[list(train_idx)]
    mean = ref.mean(0)
    std = ref.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean, std


def tensor_task(
    name: str,
    x: Tensor,
    y: Tensor,
    parts: Sequence[Sequence[int]],
    *,
    classes: int | None,
    batch_size: int,
    model: Any,
    model_options: Mapping[str, Any],
    device: Any,
    dtype: Any,
    info: dict[str, Any],
) -> Task:
    """A ``Task`` over ``x[parts[k]], y[parts[k]]`` for train/val/test; ``classes=None`` is
    regression (squared error, ``"mse"``), else cross-entropy and ``"accuracy"``."""
    train, val, test = (TensorDataset(x[list(p)], y[list(p)]) for p in parts)
    outputs = classes if classes is not None else y.shape[1]
    return Task(
        name=name,
        model_fn=model_factory(model, outputs, model_options, input_shape=tuple(x.shape[1:])),
        loss_fn=F.cross_entropy if classes is not None else squared_error,
        metric="accuracy" if classes is not None else "mse",
        train=train,
        val=val,
        test=test,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        num_classes=classes,
        info={
            "sizes": tuple(len(p) for p in parts),
            "indices": dict(zip(("train", "val", "test"), (list(p) for p in parts), strict=True)),
            **info,
        },
    )


# --- digits --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_base() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def digit_images(angle: float = 0.0, image_size: int = 8) -> Tensor:
    """All 1,797 digits, ``(1797, 1, s, s)`` in [0, 1]: resized, then rotated by ``angle``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: must be a positive integer")
    return _digit_images(float(angle), image_size).clone()


@functools.lru_cache(maxsize=16)
def _digit_images(angle: float, image_size: int) -> Tensor:
    images = _digits_base()[0]
    if image_size != images.shape[-1]:
        images = TF.resize(images, [image_size, image_size], antialias=True)
    images = rotate_images(images, angle)
    return images.clamp(0.0, 1.0)


@register_task("digits")
def digits(
    angle: float = 0.0,
    image_size: int = 8,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    batch_size: int = 128,
    model: Any = "metamd-mlp",
    model_options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Task:
    """The sklearn digits (optionally rotated by ``angle`` degrees), 10 classes."""
    labels = _digits_base()[1]
    parts = split_three(len(labels), val_fraction, test_fraction, split_seed, labels.tolist())
    x = digit_images(float(angle), image_size)
    return tensor_task(
        "digits",
        x,
        labels,
        parts,
        classes=10,
        batch_size=batch_size,
        model=model,
        model_options=dict(model_options or {}),
        device=device,
        dtype=dtype,
        info={
            "angle": float(angle),
            "image_size": image_size,
            "split_seed": split_seed,
        },
    )


class RotatedDigits(TaskSuite):
    """Six rotation domains of the digits sharing one train/val/test partition."""

    name = "rotated-digits"

    def __init__(self, domains: Sequence[str] = ROTATION_DOMAINS, **options: Any) -> None:
        domains = check_angles(domains)
        if "angle" in options:
            raise ValueError("angle=: set by the domain, not an option of the suite")
        allowed = set(inspect.signature(digits).parameters) - {"angle"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"suite 'rotated-digits': unknown option(s) {unknown}; its options are "
                f"{sorted(allowed | {'domains'})}"
            )
        self.domains = domains
        self.options = options
        digits(**options)  # validate the option values once, now

    def task(self, domain: str) -> Task:
        domain = self.check_domain(domain)
        task = digits(angle=float(domain), **self.options)
        task.name = f"rotated-digits/{domain}"
        return task


register_suite("rotated-digits")(RotatedDigits)


# --- other bundled tabular sets ----------------------------------------------------------
def _sklearn(loader: str) -> tuple[Tensor, Tensor]:
    import sklearn.datasets

    data = getattr(sklearn.datasets, loader)()
    return torch.tensor(data.data, dtype=torch.float64), torch.tensor(data.target)


def _tabular(
    name: str,
    loader: str,
    regression: bool,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    batch_size: int = 128,
    model: Any = "mlp",
    model_options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Task:
    x, y = _sklearn(loader)
    n = x.shape[0]
    strata = None if regression else y.tolist()
    parts = split_three(n, val_fraction, test_fraction, split_seed, strata)
    x, mean, std = standardise(x, parts[0])
    info: dict[str, Any] = {
        "source": f"sklearn.datasets.{loader}",
        "feature_mean": mean,
        "feature_std": std,
        "split_seed": split_seed,
    }
    if regression:
        y, t_mean, t_std = standardise(y.double().unsqueeze(1), parts[0])
        info.update(target_mean=float(t_mean), target_std=float(t_std))
        y = y.to(storage_dtype(dtype))
    else:
        y = y.long()
    return tensor_task(
        name,
        x.to(storage_dtype(dtype)),
        y,
        parts,
        classes=None if regression else int(y.max()) + 1,
        batch_size=batch_size,
        model=model,
        device=device,
        dtype=dtype,
        info=info,
        model_options=with_defaults(model, model_options, TABULAR_MODEL),
    )


breast_cancer = register_task("breast-cancer")(
    functools.partial(_tabular, "breast-cancer", "load_breast_cancer", False)
)
"""Wisconsin breast cancer: 569 x 30 standardised features, 2 classes (``_tabular`` options)."""

wine = register_task("wine")(functools.partial(_tabular, "wine", "load_wine", False))
"""Wine recognition: 178 x 13 standardised features, 3 classes."""

diabetes = register_task("diabetes")(functools.partial(_tabular, "diabetes", "load_diabetes", True))
"""Diabetes progression: 442 x 10 standardised inputs, standardised scalar target."""
