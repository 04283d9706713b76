"""torchvision-backed image tasks and suites.

Registered names:

* tasks ``"mnist"``, ``"qmnist"``, ``"kmnist"``, ``"fashion-mnist"``, ``"usps"``, ``"svhn"``:
  10-class digit/glyph classification, every image turned into a ``1 x 28 x 28`` greyscale
  tensor in ``[0, 1]`` (MetaMD section 5.2); no augmentation.
* suite ``"diverse-digits"``: those six datasets as domains, for leave-one-dataset-out
  meta-learning (MetaMD section 5.2, Table 1).
* tasks ``"cifar10"``, ``"cifar100"``, ``"stl10"``: ``3 x 32 x 32`` (STL10: ``3 x 96 x 96``)
  colour images with the augmentation of APO appendix C.5 on the training split (zero-pad
  by ``size // 8`` pixels, random ``size x size`` crop, horizontal flip with probability 0.5)
  and per-channel normalisation on every split.
* suite ``"imagefolder"``: see ``tasks.vision_folder``.

Every task's validation split is ``val_fraction`` (default 0.1) of the official training
split, drawn with the fixed ``split_seed`` (default 0); the test split is the official one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torchvision import transforms as T

import tasks.vision_folder  # noqa: F401  (registers "imagefolder")
from tasks.base import Task, TaskSuite
from tasks.registry import register_suite, register_task
from tasks.vision_data import (
    SOURCES,
    SplitView,
    VisionConfig,
    load_split,
    model_factory,
    split_indices,
)

__all__ = [
    "DIGIT_DOMAINS",
    "DiverseDigits",
    "NORMALISATION",
    "colour_task",
    "digit_task",
]

DIGIT_DOMAINS = ("mnist", "qmnist", "kmnist", "fashion-mnist", "usps", "svhn")

#: Per-channel (mean, std) of the training images, on the 0..1 scale.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}


def _task(
    name: str, cfg: VisionConfig, train_tf: Any, eval_tf: Any, num_classes: int, **info: Any
) -> Task:
    source = SOURCES[name]
    train_full = load_split(source, cfg.root, train=True, download=cfg.download)
    test = load_split(source, cfg.root, train=False, download=cfg.download)
    train_idx, val_idx = split_indices(len(train_full), cfg.val_fraction, cfg.split_seed)
    return Task(
        name=name,
        model_fn=model_factory(
            cfg.model, num_classes, cfg.model_options, input_shape=info.get("input_shape")
        ),
        loss_fn=F.cross_entropy,
        metric="accuracy",
        train=SplitView(train_full, train_idx, train_tf),
        val=SplitView(train_full, val_idx, eval_tf),
        test=SplitView(test, None, eval_tf),
        batch_size=cfg.batch_size,
        device=cfg.device,
        dtype=cfg.dtype,
        num_classes=num_classes,
        info={
            "source": source.cls.__name__,
            "root": str(source.root(cfg.root)),
            "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test)},  # type: ignore[arg-type]
            "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed,
            **info,
        },
    )


def digit_task(name: str, **options: Any) -> Task:
    """One DiverseDigits dataset as a 10-class task on ``1 x 28 x 28`` greyscale inputs.

    Every image goes through ``Grayscale(1)`` (SVHN is RGB), ``Resize((28, 28))`` (USPS is
    16 x 16, SVHN 32 x 32; a no-op for the 28 x 28 MNIST family) and ``ToTensor()`` (pixel
    ``v`` becomes ``v / 255``). Options: see ``VisionConfig`` (default model ``"lenet"``).
    """
    if name not in DIGIT_DOMAINS:
        raise ValueError(f"name={name!r}: must be one of {list(DIGIT_DOMAINS)}")
    cfg = VisionConfig(**options)
    tf = T.Compose([T.Grayscale(num_output_channels=1), T.Resize((28, 28)), T.ToTensor()])
    return _task(name, cfg, tf, tf, 10, input_shape=(1, 28, 28), augmentation=None)


def colour_task(
    name: str, augment: bool = True, image_size: int | None = None, **options: Any
) -> Task:
    """CIFAR-10, CIFAR-100 or STL-10 with APO appendix C.5 preprocessing.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"stl10"``.
        augment: random crop + horizontal flip on the training split (default ``True``);
            validation and test are never augmented.
        image_size: side of the square input (default native: 32 for CIFAR, 96 for STL10);
            other sizes resize first. The crop padding is ``image_size // 8`` (4 at 32).
        **options: see ``VisionConfig`` (default model ``"resnet18"``).
    """
    if name not in NORMALISATION:
        raise ValueError(f"name={name!r}: must be one of {list(NORMALISATION)}")
    options.setdefault("model", "resnet18")
    cfg = VisionConfig(**options)
    size = NATIVE_SIZE[name] if image_size is None else int(image_size)
    if size < 8:
        raise ValueError(f"image_size={image_size!r}: must be an integer >= 8")
    resize = [] if size == NATIVE_SIZE[name] else [T.Resize((size, size))]
    mean, std = NORMALISATION[name]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    padding = size // 8
    augmentation = [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip(0.5)]
    train_tf = T.Compose(resize + (augmentation if augment else []) + tail)
    eval_tf = T.Compose(resize + tail)
    return _task(
        name,
        cfg,
        train_tf,
        eval_tf,
        NUM_CLASSES[name],
        input_shape=(3, size, size),
        augmentation=(f"random crop {size} with zero padding {padding}, horizontal flip p=0.5"
                      if augment else None),
        normalisation={"mean": mean, "std": std},
    )  # fmt: skip


def _register_digit(name: str) -> None:
    def factory(**options: Any) -> Task:
        return digit_task(name, **options)

    factory.__name__ = f"{name.replace('-', '_')}_task"
    factory.__doc__ = f"The {name!r} DiverseDigits task (see ``digit_task``)."
    register_task(name)(factory)


def _register_colour(name: str) -> None:
    def factory(**options: Any) -> Task:
        return colour_task(name, **options)

    factory.__name__ = f"{name}_task"
    factory.__doc__ = f"The {name!r} task with APO appendix C.5 augmentation (see ``colour_task``)."
    register_task(name)(factory)


for _name in DIGIT_DOMAINS:
    _register_digit(_name)
for _name in NORMALISATION:
    _register_colour(_name)


class DiverseDigits(TaskSuite):
    """MetaMD's DiverseDigits: MNIST, QMNIST, KMNIST, FashionMNIST, USPS and SVHN.

    Each domain is ``digit_task(domain, **options)``; tasks are built on first use and
    cached. ``domains`` may restrict the suite to a subset (in the order given).
    """

    name = "diverse-digits"

    def __init__(self, domains: Sequence[str] | None = None, **options: Any) -> None:
        chosen = tuple(DIGIT_DOMAINS if domains is None else domains)
        for d in chosen:
            if d not in DIGIT_DOMAINS:
                raise ValueError(f"domains: {d!r} is not one of {list(DIGIT_DOMAINS)}")
        if len(set(chosen)) != len(chosen) or len(chosen) < 2:
            raise ValueError(f"domains={list(chosen)!r}: need at least two distinct domains")
        self.domains = chosen
        VisionConfig(**options)  # validate once, before any file is read
        self.options = options
        self._tasks: dict[str, Task] = {}

    def task(self, domain: str) -> Task:
        domain = self.check_domain(domain)
        if domain not in self._tasks:
            self._tasks[domain] = digit_task(domain, **self.options)
        return self._tasks[domain]


@register_suite("diverse-digits")
def diverse_digits(**options: Any) -> DiverseDigits:
    """The DiverseDigits suite (six 28 x 28 greyscale domains; see ``DiverseDigits``)."""
    return DiverseDigits(**options)
