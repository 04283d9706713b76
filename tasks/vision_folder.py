"""``"imagefolder"``: a suite of high-resolution image domains read with ``ImageFolder``.

``root`` holds one folder per domain (MetaMD section 5.2 uses Aircraft, Butterfly, Pets,
Caltech, DTD, Flowers, Pubfig). A domain folder is either

* ``<domain>/train/<class>/*.png`` and ``<domain>/test/<class>/*.png`` (an official split;
  both must list the same classes), or
* ``<domain>/<class>/*.png`` (no official split: a seeded ``test_fraction``, default 0.2, of
  each class's images becomes the test split).

Validation is ``val_fraction`` (default 0.1) of each class's training images. Both
partitions are stratified (every class with two or more images lands on both sides, see
``stratified_split``) and seeded by ``split_seed``. Images are resized to
``image_size x image_size`` (default 224) and normalised with the ImageNet channel
statistics. ``task(domain)`` trains on all classes of a
domain; ``sample_task(generator, holdout)`` draws a domain other than ``holdout`` and
``num_classes`` (default 20) of its classes, relabelled ``0..k-1`` in increasing original
order, as MetaMD does for each outer-loop iteration.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from tasks.base import Task, TaskSuite
from tasks.registry import register_suite
from tasks.vision_data import (
    DATA_ENV,
    ClassSubset,
    VisionConfig,
    model_factory,
    stratified_split,
)

__all__ = ["IMAGENET_NORMALISATION", "ImageFolderSuite"]

IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class _Domain:
    """One domain's datasets (untransformed) and its fixed split indices."""

    classes: list[str]
    train_base: Dataset
    train_targets: list[int]
    test_base: Dataset
    test_targets: list[int]
    train_idx: list[int]
    val_idx: list[int]
    test_idx: list[int]


def _image_folder(path: Path) -> ImageFolder:
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as err:
        raise ValueError(
            f"dataset 'imagefolder': {str(path)!r} is not a readable ImageFolder "
            f"(one sub-folder of images per class): {err}"
        ) from err


class ImageFolderSuite(TaskSuite):
    """Domains = sub-folders of ``root``; see the module docstring for layout and splits.

    Args:
        root: the folder of domains (default ``<data root>/imagefolder``).
        num_classes: classes per sampled task (default 20).
        image_size: side of the square input (default 224).
        test_fraction: test share for domains without a ``train``/``test`` split (0.2).
        augment: random horizontal flip on training images (default ``False``; MetaMD only
            resizes).
        domains: the sub-folders to use, in order (default all, sorted).
        **options: see ``VisionConfig`` (default model ``"resnet18"``; ``download`` is
            ignored: these folders are assembled by hand).
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        num_classes: int = 20,
        image_size: int = 224,
        test_fraction: float = 0.2,
        augment: bool = False,
        domains: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("model", "resnet18")
        self.config = VisionConfig(**options)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
        if int(image_size) < 8:
            raise ValueError(f"image_size={image_size!r}: must be an integer >= 8")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction={test_fraction!r}: must lie in (0, 1)")
        self.root = Path(root).expanduser() if root else self.config.root / "imagefolder"
        if not self.root.is_dir():
            raise ValueError(
                f"dataset 'imagefolder': root {str(self.root)!r} does not exist; pass root= "
                f"(or set data_root/${DATA_ENV}) to a folder with one ImageFolder per domain"
            )
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")
        chosen = list(found if domains is None else domains)
        for d in chosen:
            if d not in found:
                raise ValueError(
                    f"domains: {d!r} is not a folder under {str(self.root)!r}; found {found}"
                )
        if len(chosen) < 1:
            raise ValueError(f"root={str(self.root)!r}: holds no domain folders")
        self.domains = tuple(chosen)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.test_fraction = float(test_fraction)
        self.augment = bool(augment)
        size = (self.image_size, self.image_size)
        tail = [T.ToTensor(), T.Normalize(*IMAGENET_NORMALISATION)]
        flip = [T.RandomHorizontalFlip(0.5)] if self.augment else []
        self.train_transform = T.Compose([T.Resize(size), *flip, *tail])
        self.eval_transform = T.Compose([T.Resize(size), *tail])
        self._domains: dict[str, _Domain] = {}

    # --- data ----------------------------------------------------------------------------
    def _domain(self, domain: str) -> _Domain:
        domain = self.check_domain(domain)
        if domain in self._domains:
            return self._domains[domain]
        path = self.root / domain
        cfg = self.config
        if (path / "train").is_dir() and (path / "test").is_dir():
            train, test = _image_folder(path / "train"), _image_folder(path / "test")
            if train.classes != test.classes:
                raise ValueError(
                    f"domain {domain!r}: train classes {train.classes} differ from test "
                    f"classes {test.classes}"
                )
            rest = list(range(len(train)))
            test_idx = list(range(len(test)))
        else:
            train = test = _image_folder(path)
            rest, test_idx = stratified_split(
                train.targets, range(len(train)), self.test_fraction, cfg.split_seed
            )
        train_idx, val_idx = stratified_split(
            train.targets, rest, cfg.val_fraction, cfg.split_seed + 1
        )
        self._domains[domain] = _Domain(
            classes=list(train.classes),
            train_base=train,
            train_targets=list(train.targets),
            test_base=test,
            test_targets=list(test.targets),
            train_idx=train_idx,
            val_idx=val_idx,
            test_idx=test_idx,
        )
        return self._domains[domain]

    def classes(self, domain: str) -> list[str]:
        """The class names of ``domain`` (ImageFolder order: sorted folder names)."""
        return list(self._domain(domain).classes)

    # --- tasks ---------------------------------------------------------------------------
    def class_subset_task(self, domain: str, classes: Sequence[int]) -> Task:
        """``domain`` restricted to class indices ``classes``; ``classes[j]`` becomes label j."""
        d = self._domain(domain)
        chosen = [int(c) for c in classes]
        if len(set(chosen)) != len(chosen) or len(chosen) < 2:
            raise ValueError(f"classes={chosen!r}: need at least two distinct class indices")
        for c in chosen:
            if not 0 <= c < len(d.classes):
                raise ValueError(
                    f"classes: {c} is not a class index of domain {domain!r} "
                    f"(0..{len(d.classes) - 1})"
                )
        cfg = self.config
        train = ClassSubset(
            d.train_base, d.train_idx, d.train_targets, chosen, self.train_transform
        )
        val = ClassSubset(d.train_base, d.val_idx, d.train_targets, chosen, self.eval_transform)
        test = ClassSubset(d.test_base, d.test_idx, d.test_targets, chosen, self.eval_transform)
        if len(train) == 0 or len(val) == 0 or len(test) == 0:
            raise ValueError(
                f"domain {domain!r}, classes {chosen}: a split is empty "
                f"(train {len(train)}, val {len(val)}, test {len(test)}); add images"
            )
        k = len(chosen)
        return Task(
            name=f"imagefolder/{domain}",
            model_fn=model_factory(
                cfg.model, k, cfg.model_options, input_shape=(3, self.image_size, self.image_size)
            ),
            loss_fn=F.cross_entropy,
            metric="accuracy",
            train=train,
            val=val,
            test=test,
            batch_size=cfg.batch_size,
            device=cfg.device,
            dtype=cfg.dtype,
            num_classes=k,
            info={
                "root": str(self.root / domain),
                "class_indices": chosen,
                "classes": [d.classes[c] for c in chosen],
                "sizes": {"train": len(train), "val": len(val), "test": len(test)},
                "input_shape": (3, self.image_size, self.image_size),
                "val_fraction": cfg.val_fraction,
                "split_seed": cfg.split_seed,
            },
        )

    def task(self, domain: str) -> Task:
        """All classes of ``domain``."""
        return self.class_subset_task(domain, range(len(self._domain(domain).classes)))

    def sample_task(self, generator: torch.Generator, holdout: str | None = None) -> Task:
        """A domain other than ``holdout`` and ``num_classes`` of its classes, both drawn
        from ``generator``; the classes keep their original order and are relabelled 0..k-1.
        """
        if holdout is not None:
            self.check_domain(holdout, "holdout")
        names = [d for d in self.domains if d != holdout]
        if not names:
            raise ValueError(f"holdout={holdout!r}: leaves no domain to sample from")
        domain = names[int(torch.randint(len(names), (1,), generator=generator))]
        n = len(self._domain(domain).classes)
        if n < self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes}: domain {domain!r} has only {n} classes"
            )
        picked = torch.randperm(n, generator=generator)[: self.num_classes]
        return self.class_subset_task(domain, sorted(picked.tolist()))


@register_suite("imagefolder")
def imagefolder_suite(**options: Any) -> ImageFolderSuite:
    """High-resolution ImageFolder domains with class-subset sampling (``ImageFolderSuite``)."""
    options.pop("download", None)
    return ImageFolderSuite(**options)
