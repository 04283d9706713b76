"""Model zoo: ``get_model(name, num_classes=k, **options)`` and ``available_models()``.

Names (options in brackets, defaults after ``=``):

* ``"mlp"``: flatten, then ``Linear -> act`` per hidden width, then ``Linear(-, k)``
  [``in_features=784``, ``widths=(1000, 1000)`` (APO's MNIST MLP), ``activation="relu"``,
  ``bias=True``]. ``widths=()`` is a linear model.
* ``"metamd-mlp"``: MetaMD's "3-layer MLP" (section 5.2): three linear layers, ReLU,
  hidden widths ``(256, 256)`` [``in_features=784``, ``widths``, ``activation``]. The paper
  does not state the widths; 256 is our choice.
* ``"lenet"``: LeNet-5 (conv 6@5x5, max-pool, conv 16@5x5, max-pool, 120, 84, k)
  [``in_channels=1``, ``input_size=28``, ``activation="relu"``]. A convolution pads by 2
  when its input is smaller than 32 (first) / 10 (second) pixels, so 28x28 gives the
  classic 16x5x5 features, 32x32 the same without padding, and 8x8 digits 16x2x2.
* ``"alexnet-small"``: the CIFAR AlexNet of cuda-convnet (conv 64@5x5, max-pool 3/2,
  conv 64@5x5, max-pool 3/2, 384, 192, k) [``in_channels=3``, ``input_size=32``,
  ``channels=(64, 64)``, ``hidden=(384, 192)``].
* ``"vgg16"``: torchvision's VGG-16 configuration ``"D"`` without batch norm
  (``torchvision.models.vgg.make_layers``), global average pooling and a 512-512-k
  classifier for small images [``in_channels=3``, ``width=512``, ``dropout=0.0``,
  ``input_size`` (checked to be >= 32)]; torchvision's initialisation.
* ``"resnet18"``: ``torchvision.models.resnet18(num_classes=k)`` [``in_channels=3``,
  ``cifar_stem=False``: a 3x3 stride-1 first convolution and no max-pool].
* ``"resnet32"``: the CIFAR ResNet of He et al. (2016): 3x3 conv 16, three stages of
  ``blocks_per_stage=5`` torchvision ``BasicBlock``s with 16, 32, 64 channels (1x1-conv
  projection shortcuts when the shape changes), global average pooling, ``Linear(64, k)``
  [``in_channels=3``, ``blocks_per_stage=5``].
* ``"autoencoder"``: the deep autoencoder of APO appendix C.4 / Martens & Grosse:
  784-1000-500-250-30-250-500-1000-784, sigmoid after every layer but the 30-unit code
  layer (linear, as in Hinton & Salakhutdinov) and the output, which returns logits
  (train with ``binary_cross_entropy_with_logits`` against the flattened input)
  [``in_features=784``, ``widths=(1000, 500, 250, 30)``]. ``num_classes`` must be
  ``None`` or ``in_features``.
* ``"two-layer-linear"``: ``W2 W1 x``, no biases (APO section 6.1) [``in_features=10``,
  ``hidden=in_features``]; the output has ``num_classes`` entries (default ``in_features``).

The architectures live in ``tasks.nets``. Every model also accepts ``input_shape=(C, H, W)``
or ``(D,)``: it fills in whichever of ``in_features`` / ``in_channels`` / ``input_size`` the
model takes and were not given, so a task can describe its inputs once whatever model is
chosen.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from metaopt.registry import Registry, keyword_options
from tasks.nets import (
    ACTIVATIONS,
    alexnet_small,
    autoencoder,
    lenet,
    metamd_mlp,
    mlp,
    resnet18,
    resnet32,
    two_layer_linear,
    vgg16,
)

__all__ = ["ACTIVATIONS", "MODELS", "available_models", "get_model", "register_model"]

#: model builders by name: ``builder(num_classes=..., **options) -> nn.Module``
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(
    name: str, builder: Callable[..., nn.Module], *, replace: bool = False
) -> Callable[..., nn.Module]:
    """Make ``builder`` available as ``model=name`` to every task; an existing name raises
    ``ValueError`` unless ``replace=True``."""
    MODELS.register(name, builder, replace=replace)
    return builder


for _name, _builder in (
    ("mlp", mlp), ("metamd-mlp", metamd_mlp), ("lenet", lenet), ("alexnet-small", alexnet_small),
    ("vgg16", vgg16), ("resnet18", resnet18), ("resnet32", resnet32),
    ("autoencoder", autoencoder), ("two-layer-linear", two_layer_linear),
):  # fmt: skip
    register_model(_name, _builder)


def available_models() -> list[str]:
    """Every model name ``get_model`` accepts."""
    return MODELS.available()


def _geometry(params: Sequence[str], input_shape: Sequence[int]) -> dict[str, int]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape={input_shape!r}: must be (C, H, W) or (D,), all positive")
    out: dict[str, int] = {}
    if "in_features" in params:
        out["in_features"] = math.prod(shape)
    if "in_channels" in params:
        if len(shape) != 3:
            raise ValueError(f"input_shape={input_shape!r}: this model needs images (C, H, W)")
        out["in_channels"] = shape[0]
    if "input_size" in params:
        if shape[1] != shape[2]:
            raise ValueError(f"input_shape={input_shape!r}: this model needs square images")
        out["input_size"] = shape[1]
    return out


def get_model(
    name: str,
    num_classes: int | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (``None``: the model's default).

    Args:
        name: one of ``available_models()``.
        num_classes: output width (classes, or regression outputs).
        input_shape: shape of one input, used to fill in the model's geometry options.
        options: the model's own options (see the module docstring).

    Raises:
        ValueError: unknown name (listing the names) or option (listing the options).
    """
    builder = MODELS.get(name).obj
    allowed = keyword_options(builder, supplied=("num_classes",))  # None: it takes **options
    unknown = [] if allowed is None else sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown option(s) {unknown}; options are {allowed} and input_shape"
        )
    if input_shape is not None:
        named = list(inspect.signature(builder).parameters)  # the geometry it names
        for key, value in _geometry(named, input_shape).items():
            options.setdefault(key, value)
    if num_classes is not None:
        options["num_classes"] = num_classes
    return builder(**options)
