"""Rotation domains (MetaMD section 5.2, RotatedMNIST): the one rotation every rotated suite
uses, and suite ``"rotated-mnist"`` on the real MNIST files.

``rotate_images`` turns images counter-clockwise by ``angle`` degrees about their centre
(``torchvision.transforms.functional.rotate``, bilinear, zero fill; 0 is exactly the
identity and 90 a quarter turn). ``"rotated-digits"`` (``tasks.tabular``) applies it to the
bundled 8x8 digits; ``"rotated-mnist"`` applies it, image by image, to the ``"mnist"`` task
of ``tasks.vision`` (``1 x 28 x 28`` in [0, 1]; data root, ``download`` and the other
``VisionConfig`` options as for ``"mnist"``; default model ``"metamd-mlp"``, MetaMD's
3-layer MLP). Every domain shares the ``"mnist"`` task's seeded train/validation partition
and the official test split, so a held-out domain's test digits are never, in any rotation,
in a training split.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tasks.base import Task, TaskSuite
from tasks.registry import register_suite
from tasks.vision import digit_task
from tasks.vision_data import VisionConfig

__all__ = ["ROTATION_DOMAINS", "RotatedMNIST", "RotatedView", "check_angles", "rotate_images"]

ROTATION_DOMAINS = ("0", "15", "30", "45", "60", "75")


def rotate_images(images: Tensor, angle: float) -> Tensor:
    """``images`` (``(..., C, H, W)``) rotated ``angle`` degrees counter-clockwise.

    A multiple of 360 returns ``images`` unchanged: the bilinear resampling grid is exact
    only up to float rounding (a few 1e-6 at 28x28), and domain "0" must be the data itself.
    """
    if float(angle) % 360.0 == 0.0:
        return images
    return TF.rotate(images, float(angle), interpolation=InterpolationMode.BILINEAR)


def check_angles(domains: Sequence[str]) -> tuple[str, ...]:
    """Domain names as strings; each must parse as an angle in degrees, all distinct."""
    out = tuple(str(d) for d in domains)
    for d in out:
        try:
            float(d)
        except ValueError:
            raise ValueError(f"domains: {d!r} is not an angle in degrees") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"domains={list(out)!r}: must be distinct and non-empty")
    return out


class RotatedView(Dataset):
    """``(rotate_images(x, angle), y)`` for every ``(x, y)`` of ``base`` (tensor images)."""

    def __init__(self, base: Dataset, angle: float) -> None:
        self.base = base
        self.angle = float(angle)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        x, y = self.base[i]
        return rotate_images(x, self.angle), y


class RotatedMNIST(TaskSuite):
    """MNIST rotated by each domain's angle (default 0, 15, ..., 75 degrees)."""

    name = "rotated-mnist"

    def __init__(self, domains: Sequence[str] = ROTATION_DOMAINS, **options: Any) -> None:
        self.domains = check_angles(domains)
        options.setdefault("model", "metamd-mlp")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(VisionConfig)})
        if unknown:
            raise ValueError(
                f"suite 'rotated-mnist': unknown option(s) {unknown}; its options are domains "
                f"and {sorted(f.name for f in dataclasses.fields(VisionConfig))}"
            )
        VisionConfig(**options)  # validate before any file is read
        self.options = options
        self._base: Task | None = None

    def task(self, domain: str) -> Task:
        domain = self.check_domain(domain)
        if self._base is None:
            self._base = digit_task("mnist", **self.options)
        base = self._base
        angle = float(domain)
        task = copy.copy(base)
        task.name = f"rotated-mnist/{domain}"
        task.train = RotatedView(base.train, angle)
        task.val = RotatedView(base.val, angle)
        task.test = RotatedView(base.test, angle)
        task.info = {**base.info, "angle": angle}
        return task


register_suite("rotated-mnist")(RotatedMNIST)
