"""Model zoo: architectures against published sizes, and one training step per model on a
batch from a task whose inputs it matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import tasks
from tasks.models import MODELS, available_models, get_model, register_model

NAMES = [
    "alexnet-small",
    "autoencoder",
    "lenet",
    "metamd-mlp",
    "mlp",
    "resnet18",
    "resnet32",
    "two-layer-linear",
    "vgg16",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_widths(model: nn.Module) -> list[int]:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [layers[0].in_features] + [m.out_features for m in layers]


def test_names_and_errors():
    assert available_models() == NAMES
    with pytest.raises(ValueError, match=r"model='resnet50' is unknown.*'lenet'.*'vgg16'"):
        get_model("resnet50", num_classes=10)
    with pytest.raises(ValueError, match=r"model 'lenet': unknown option\(s\) \['depth'\]"):
        get_model("lenet", num_classes=10, depth=3)
    with pytest.raises(ValueError, match="activation='swish'"):
        get_model("mlp", num_classes=10, activation="swish")
    with pytest.raises(ValueError, match="num_classes=10: the autoencoder"):
        get_model("autoencoder", num_classes=10)
    with pytest.raises(ValueError, match="input_size=2: LeNet needs"):
        get_model("lenet", num_classes=10, input_size=2)
    with pytest.raises(ValueError, match="widths=.*exactly two hidden"):
        get_model("metamd-mlp", num_classes=10, widths=(5,))
    with pytest.raises(ValueError, match="input_size=8: VGG-16's five max-pools"):
        tasks.get_task("digits", model="vgg16").make_model(0)
    with pytest.raises(ValueError, match="input_shape=.*square"):
        get_model("lenet", num_classes=10, input_shape=(1, 8, 9))


def test_published_sizes():
    # LeNet-5 on 28 x 28 (6@5x5 pad 2, 16@5x5, 120, 84, 10): 61,706 parameters
    assert n_params(get_model("lenet", num_classes=10)) == 61_706
    # the same on 32 x 32 without padding; 3-channel: +2 * 150 first-layer weights
    assert n_params(get_model("lenet", num_classes=10, input_size=32)) == 61_706
    assert n_params(get_model("lenet", num_classes=10, in_channels=3, input_size=32)) == 62_006
    # torchvision / He et al.: ResNet-18 (1000 classes) has 11,689,512 parameters
    assert n_params(get_model("resnet18", num_classes=1000)) == 11_689_512
    # ResNet-32 with identity (option A) shortcuts has 464,154; projections add
    # (16*32 + 2*32) + (32*64 + 2*64) = 2,752
    assert n_params(get_model("resnet32", num_classes=10)) == 464_154 + 2_752
    assert (
        sum(
            isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
            for m in get_model("resnet32").modules()
        )
        == 31
    )
    # VGG-16 convolutions (config D): 14,714,688 parameters, 13 conv layers, no batch norm
    vgg = get_model("vgg16", num_classes=10)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and sum(n_params(c) for c in convs) == 14_714_688
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg.modules())
    assert linear_widths(vgg) == [512, 512, 512, 10]
    # the APO / Martens-Grosse deep autoencoder
    ae = get_model("autoencoder")
    assert linear_widths(ae) == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sum(isinstance(m, nn.Sigmoid) for m in ae.modules()) == 6  # not code, not output
    assert linear_widths(get_model("metamd-mlp", num_classes=10, in_features=64)) == [
        64,
        256,
        256,
        10,
    ]
    assert linear_widths(get_model("mlp", num_classes=3, widths=(7,), in_features=5)) == [5, 7, 3]
    two = get_model("two-layer-linear", in_features=6, hidden=4)
    assert [tuple(p.shape) for p in two.parameters()] == [(4, 6), (6, 4)]
    stem = get_model("resnet18", num_classes=10, cifar_stem=True)
    assert stem.conv1.kernel_size == (3, 3) and stem.conv1.stride == (1, 1)
    assert isinstance(stem.maxpool, nn.Identity)


def test_input_shape_fills_geometry_but_explicit_options_win():
    m = get_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=())
    assert linear_widths(m) == [64, 10]
    m = get_model("lenet", num_classes=10, input_shape=(3, 32, 32), in_channels=3)
    assert m.conv1.in_channels == 3 and m.conv1.padding == (0, 0)
    m = get_model("mlp", num_classes=10, input_shape=(1, 8, 8), in_features=100, widths=())
    assert linear_widths(m) == [100, 10]


def _step(model: nn.Module, task: tasks.Task, batch_size: int) -> None:
    x, y = next(task.train_batches(0, batch_size=batch_size))
    out = model(x)
    loss = task.loss(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "options"),
    [("mlp", {}), ("metamd-mlp", {}), ("lenet", {}), ("lenet", {"image_size": 28})],
)
def test_digit_models_train_on_digits(model, options):
    task = tasks.get_task("digits", model=model, **options)
    _step(task.make_model(0), task, 16)


def test_two_layer_linear_on_ill_conditioned_regression():
    task = tasks.get_task("ill-conditioned-regression")
    _step(task.make_model(0), task, 16)


def test_autoencoder_reconstructs_digits_resized_to_28():
    task = tasks.get_task("digits", image_size=28)
    model = get_model("autoencoder")
    x, _ = next(task.train_batches(0, batch_size=8))
    loss = F.binary_cross_entropy_with_logits(model(x), x.flatten(1))
    loss.backward()
    assert model(x).shape == (8, 784) and torch.isfinite(loss)


@pytest.fixture(scope="module")
def colour_task_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / "d" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("alexnet-small", {}),
        ("lenet", {"in_channels": 3, "input_size": 32}),
        ("lenet", {}),  # geometry from the task's input_shape
        ("mlp", {"widths": (8,)}),  # in_features 3 * 32 * 32 from the task
        ("resnet32", {}),
        ("resnet18", {"cifar_stem": True}),
        ("vgg16", {}),
    ],
)
def test_colour_models_train_on_32x32_images(colour_task_root, model, options):
    suite = tasks.get_suite(
        "imagefolder",
        root=colour_task_root,
        image_size=32,
        num_classes=3,
        model=model,
        model_options=options,
    )
    task = suite.task("d")
    net = task.make_model(0)
    _step(net, task, 2)
    assert net(next(task.train_batches(0, batch_size=2))[0]).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights(name):
    options = {"num_classes": 10} if name not in ("autoencoder", "two-layer-linear") else {}
    task = tasks.get_task("digits")
    builds = []
    for seed in (0, 0, 1):
        task.model_fn = lambda: get_model(name, **options)  # noqa: B023
        builds.append(task.make_model(seed))
    a, b, c = ([p.detach() for p in m.parameters()] for m in builds)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_a_user_builder_taking_keyword_options_gets_every_option():
    """``builder(num_classes=..., **options)`` (the registry's contract): a builder with
    ``**options`` checks its own options, so every one reaches it; one with named options
    only still has unknown ones refused."""

    def wide(in_features: int = 3, num_classes: int = 2, **options):
        return nn.Linear(in_features, options.pop("width") * num_classes)

    def narrow(num_classes: int = 2, width: int = 4):
        return nn.Linear(5, width * num_classes)

    register_model("test-wide", wide)
    register_model("test-narrow", narrow)
    try:
        model = get_model("test-wide", num_classes=3, width=5, input_shape=(1, 2, 3))
        assert (model.in_features, model.out_features) == (6, 15)  # 1*2*3 inputs, 5*3 outputs
        assert get_model("test-narrow", num_classes=3, width=5).out_features == 15
        with pytest.raises(ValueError, match=r"model 'test-narrow': unknown option\(s\) \['w'\]"):
            get_model("test-narrow", w=5)
    finally:
        MODELS.unregister("test-wide")
        MODELS.unregister("test-narrow")
