"""The architectures behind ``tasks.models.get_model`` (see that module for the names and
options): fully connected nets, LeNet-5, the small AlexNet, VGG-16, ResNet-18/32."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = [
    "ACTIVATIONS",
    "CifarResNet",
    "alexnet_small",
    "autoencoder",
    "lenet",
    "metamd_mlp",
    "mlp",
    "resnet18",
    "resnet32",
    "two_layer_linear",
    "vgg16",
]

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
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    width: int = 512,
    dropout: float = 0.0,
    input_size: int | None = None,
) -> nn.Sequential:
    """VGG-16 (config ``"D"``, no batch norm) with a small-image classifier.

    ``input_size`` (optional) is only checked: five 2x2 max-pools need at least 32 pixels.
    """
    if input_size is not None and _positive("input_size", input_size) < 32:
        raise ValueError(f"input_size={input_size!r}: VGG-16's five max-pools need >= 32 pixels")
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
