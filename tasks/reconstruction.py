"""Reconstruction tasks ``"autoencoder:<name>"``: an image task whose targets are its inputs.

The deep-autoencoder benchmark of APO section 6.1 / appendix C.4 (the set-up of Martens &
Grosse): ``get_task("autoencoder:mnist", data_root=...)`` takes the ``"mnist"`` task's
images (any registered task whose inputs lie in ``[0, 1]``: ``"digits"``, ``"mnist"``,
``"fashion-mnist"``, ...; the options other than the ones below go to that task), uses the
flattened image as the target, and trains ``tasks.models`` ``"autoencoder"`` (784-1000-500-
250-30 and mirror, sigmoid; its ``in_features`` follows the images) with the Bernoulli
cross-entropy ``sum_pixels BCE(sigmoid(logits), x)`` averaged over the batch (Martens &
Grosse's per-case error). ``task.evaluate`` reports ``"mse"``: the mean squared error of the
reconstructed intensities ``sigmoid(logits)`` (``Task.prediction_fn``). Default batch size
512 (appendix C.4). APO's ``lambda_wd = 1e-5`` L2 term belongs to the optimizer (weight
decay), not to this loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from tasks.base import Task
from tasks.registry import get_task, register_task
from tasks.synthetic import storage_dtype
from tasks.vision_data import model_factory

__all__ = ["Reconstruction", "autoencoder_task", "bernoulli_cross_entropy", "reconstruction"]


def bernoulli_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``sum`` over pixels of ``BCE(sigmoid(logits), target)``, mean over the ``N`` rows."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


class Reconstruction(Dataset):
    """``(x, x.flatten())`` for every ``(x, label)`` of ``base``; the target in ``dtype``."""

    def __init__(self, base: Dataset, dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.base[i][0]
        return x, x.reshape(-1).to(self.dtype)


def reconstruction(base: Dataset, dtype: torch.dtype | None = None) -> Dataset:
    """The reconstruction view of ``base`` (a ``TensorDataset`` stays one, for fast batches);
    targets are stored in ``dtype`` (float32 unless a float dtype is given), since batch
    streams cast inputs only."""
    target_dtype = storage_dtype(dtype)
    if isinstance(base, TensorDataset):
        x = base.tensors[0]
        return TensorDataset(x, x.reshape(x.shape[0], -1).to(target_dtype))
    return Reconstruction(base, target_dtype)


@register_task("autoencoder:<name>")
def autoencoder_task(
    name: str,
    model: Any = "autoencoder",
    model_options: Mapping[str, Any] | None = None,
    batch_size: int = 512,
    **options: Any,
) -> Task:
    """Reconstruct the images of task ``name`` (built with ``options``)."""
    if name.startswith("autoencoder:"):
        raise ValueError(f"task='autoencoder:{name}': nested autoencoder tasks are not allowed")
    base = get_task(name, **options)
    x0 = base.train[0][0]
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise ValueError(f"task {name!r}: inputs are not float tensors; cannot reconstruct them")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"task {name!r}: inputs span [{lo:.3g}, {hi:.3g}], but the Bernoulli "
            "reconstruction loss needs intensities in [0, 1] (use an unnormalised image task)"
        )
    shape = tuple(x0.shape)
    return Task(
        name=f"autoencoder:{name}",
        model_fn=model_factory(model, math.prod(shape), model_options, input_shape=shape),
        loss_fn=bernoulli_cross_entropy,
        metric="mse",
        train=reconstruction(base.train, base.dtype),
        val=reconstruction(base.val, base.dtype),
        test=reconstruction(base.test, base.dtype),
        batch_size=batch_size,
        device=base.device,
        dtype=base.dtype,
        prediction_fn=torch.sigmoid,
        info={"source_task": name, "input_shape": shape, "source_info": base.info},
    )
