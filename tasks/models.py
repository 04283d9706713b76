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
  classifier for small images [``in_channels=3``, ``width=512``, ``dropout=0.0``];
  torchvision's initialisation.
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

Every model also accepts ``input_shape=(C, H, W)`` or ``(D,)``: it fills in whichever of
``in_features`` / ``in_channels`` / ``input_size`` the model takes and were not given, so a
task can describe its inputs once whatever model is chosen.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = ["ACTIVATIONS", "available_models", "get_model"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: must be one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


def _widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(widths)
    except TypeError:
        raise ValueError(f"{name}={widths!r}: must be a sequence of positive integers") from None
    for w in out:
        _positive(name, w)
    return out


# --- fully connected ------------------------------------------------------------------------
def mlp(
    num_classes: int = 10,
    *,
    in_features: int = 784,
    widths: Sequence[int] = (1000, 1000),
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """``Flatten`` then ``Linear(in, w) -> act`` per width, then ``Linear(-, num_classes)``."""
    sizes = (_positive("in_features", in_features), *_widths("widths", widths))
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i in range(len(sizes) - 1):
        layers.append((f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1], bias=bias)))
        layers.append((f"act{i + 1}", _act(activation)))
    layers.append(("out", nn.Linear(sizes[-1], _positive("num_classes", num_classes), bias=bias)))
    return nn.Sequential(OrderedDict(layers))


def metamd_mlp(
    num_classes: int = 10,
    *,
    in_features: int = 784,
    widths: Sequence[int] = (256, 256),
    activation: str = "relu",
) -> nn.Sequential:
    """MetaMD's 3-layer MLP: ``in -> 256 -> 256 -> num_classes`` (two hidden layers)."""
    if len(tuple(widths)) != 2:
        raise ValueError(f"widths={widths!r}: the 3-layer MLP has exactly two hidden widths")
    return mlp(num_classes, in_features=in_features, widths=widths, activation=activation)


def autoencoder(
    num_classes: int | None = None,
    *,
    in_features: int = 784,
    widths: Sequence[int] = (1000, 500, 250, 30),
) -> nn.Sequential:
    """Encoder ``in -> widths`` and mirrored decoder back to ``in``; returns logits."""
    in_features = _positive("in_features", in_features)
    if num_classes is not None and num_classes != in_features:
        raise ValueError(
            f"num_classes={num_classes!r}: the autoencoder reconstructs its input, so its "
            f"output width is in_features={in_features}; pass num_classes=None"
        )
    enc = _widths("widths", widths)
    if not enc:
        raise ValueError("widths=(): the autoencoder needs at least one hidden width")
    sizes = (in_features, *enc, *reversed(enc[:-1]), in_features)
    code = len(enc)  # index of the layer producing the code
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i in range(len(sizes) - 1):
        layers.append((f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1])))
        if i + 1 != code and i + 1 != len(sizes) - 1:
            layers.append((f"act{i + 1}", nn.Sigmoid()))
    return nn.Sequential(OrderedDict(layers))


def two_layer_linear(
    num_classes: int | None = None, *, in_features: int = 10, hidden: int | None = None
) -> nn.Sequential:
    """``x -> W2 W1 x`` with ``W1: hidden x in``, ``W2: out x hidden``, no biases."""
    in_features = _positive("in_features", in_features)
    hidden = in_features if hidden is None else _positive("hidden", hidden)
    out = in_features if num_classes is None else _positive("num_classes", num_classes)
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(in_features, hidden, bias=False)),
                ("fc2", nn.Linear(hidden, out, bias=False)),
            ]
        )
    )


# --- convolutional --------------------------------------------------------------------------
def lenet(
    num_classes: int = 10,
    *,
    in_channels: int = 1,
    input_size: int = 28,
    activation: str = "relu",
) -> nn.Sequential:
    """LeNet-5 for ``in_channels x input_size x input_size`` images."""
    s = _positive("input_size", input_size)
    pad1 = 2 if s < 32 else 0
    s = (s + 2 * pad1 - 4) // 2
    pad2 = 2 if s < 10 else 0
    s = (s + 2 * pad2 - 4) // 2
    if s < 1:
        raise ValueError(f"input_size={input_size!r}: LeNet needs images of at least 4x4 pixels")
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(_positive("in_channels", in_channels), 6, 5, padding=pad1)),
                ("act1", _act(activation)),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(6, 16, 5, padding=pad2)),
                ("act2", _act(activation)),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(16 * s * s, 120)),
                ("act3", _act(activation)),
                ("fc2", nn.Linear(120, 84)),
                ("act4", _act(activation)),
                ("out", nn.Linear(84, _positive("num_classes", num_classes))),
            ]
        )
    )


def alexnet_small(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    channels: Sequence[int] = (64, 64),
    hidden: Sequence[int] = (384, 192),
) -> nn.Sequential:
    """cuda-convnet's CIFAR AlexNet: two 5x5 conv + 3/2 max-pool stages, two hidden FCs."""
    c = _widths("channels", channels)
    if len(c) != 2:
        raise ValueError(f"channels={channels!r}: must be two positive integers")
    c1, c2 = c
    h = _widths("hidden", hidden)
    s = _positive("input_size", input_size)
    for _ in range(2):
        s = (s + 2 - 3) // 2 + 1  # MaxPool2d(3, 2, padding=1) after a same-size conv
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(_positive("in_channels", in_channels), c1, 5, padding=2)),
        ("act1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, 2, padding=1)),
        ("conv2", nn.Conv2d(c1, c2, 5, padding=2)),
        ("act2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(3, 2, padding=1)),
        ("flatten", nn.Flatten()),
    ]
    sizes = (c2 * s * s, *h)
    for i in range(len(h)):
        layers += [(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1])), (f"act{i + 3}", nn.ReLU())]
    layers.append(("out", nn.Linear(sizes[-1], _positive("num_classes", num_classes))))
    return nn.Sequential(OrderedDict(layers))


def _init_like_torchvision(module: nn.Module) -> None:
    """torchvision's VGG/ResNet scheme: Kaiming-normal (fan-out) convs, N(0, 0.01) linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def vgg16(
    num_classes: int = 10, *, in_channels: int = 3, width: int = 512, dropout: float = 0.0
) -> nn.Sequential:
    """VGG-16 (config ``"D"``, no batch norm) with a small-image classifier."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout!r}: must lie in [0, 1)")
    features = torchvision.models.vgg.make_layers(
        torchvision.models.vgg.cfgs["D"], batch_norm=False
    )
    if in_channels != 3:
        features[0] = nn.Conv2d(_positive("in_channels", in_channels), 64, 3, padding=1)
    width = _positive("width", width)
    model = nn.Sequential(
        OrderedDict(
            [
                ("features", features),
                ("avgpool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(512, width)),
                ("act1", nn.ReLU()),
                ("drop1", nn.Dropout(dropout)),
                ("fc2", nn.Linear(width, width)),
                ("act2", nn.ReLU()),
                ("drop2", nn.Dropout(dropout)),
                ("out", nn.Linear(width, _positive("num_classes", num_classes))),
            ]
        )
    )
    _init_like_torchvision(model)
    return model


def resnet18(num_classes: int = 10, *, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    """``torchvision.models.resnet18``; ``cifar_stem`` swaps in a 3x3/1 conv and no max-pool."""
    model = torchvision.models.resnet18(num_classes=_positive("num_classes", num_classes))
    if cifar_stem or in_channels != 3:
        k, stride, pad = (3, 1, 1) if cifar_stem else (7, 2, 3)
        model.conv1 = nn.Conv2d(
            _positive("in_channels", in_channels), 64, k, stride, pad, bias=False
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if cifar_stem:
        model.maxpool = nn.Identity()
    return model


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2) built from torchvision's ``BasicBlock``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 5):
        super().__init__()
        n = _positive("blocks_per_stage", blocks_per_stage)
        self.conv1 = nn.Conv2d(_positive("in_channels", in_channels), 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        planes_in = 16
        for i, planes in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or planes_in != planes:
                    down = nn.Sequential(conv1x1(planes_in, planes, s), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(planes_in, planes, s, down))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, _positive("num_classes", num_classes))
        _init_like_torchvision(self)
        nn.init.kaiming_uniform_(self.fc.weight, a=math.sqrt(5))  # nn.Linear's default
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet32(
    num_classes: int = 10, *, in_channels: int = 3, blocks_per_stage: int = 5
) -> CifarResNet:
    """ResNet-32 for CIFAR: ``CifarResNet`` with 5 blocks per stage."""
    return CifarResNet(num_classes, in_channels, blocks_per_stage)


# --- registry ------------------------------------------------------------------------------
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "metamd-mlp": metamd_mlp,
    "lenet": lenet,
    "alexnet-small": alexnet_small,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet32": resnet32,
    "autoencoder": autoencoder,
    "two-layer-linear": two_layer_linear,
}


def available_models() -> list[str]:
    """Every model name ``get_model`` accepts."""
    return sorted(_MODELS)


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
    if name not in _MODELS:
        raise ValueError(f"model={name!r} is unknown; available models: {available_models()}")
    builder = _MODELS[name]
    params = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown option(s) {unknown}; options are {params} and input_shape"
        )
    if input_shape is not None:
        for key, value in _geometry(params, input_shape).items():
            options.setdefault(key, value)
    if num_classes is not None:
        options["num_classes"] = num_classes
    return builder(**options)
