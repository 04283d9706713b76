"""Layer views against autograd: the matrix view and curvature matrices of every layer kind."""

import pytest
import torch
from torch import nn

from metaopt.kron.layers import layer_views


def _grads(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
def test_linear_view_shapes_and_roundtrip(bias):
    m = nn.Linear(5, 3, bias=bias)
    (v,) = layer_views(m)
    assert v.kind == "linear" and v.shape == (3, 5 + bias)
    g = _grads(m, torch.randn(4, 5))
    mat = v.to_matrix(g)
    assert torch.equal(mat[:, :5], g["weight"])
    if bias:
        assert torch.equal(mat[:, 5], g["bias"])
    back = v.from_matrix(mat)
    assert all(torch.equal(back[k], g[k]) for k in g)


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=0, dilation=1, bias=True),
    dict(kernel_size=(3, 2), stride=2, padding=1, dilation=1, bias=False),
    dict(kernel_size=2, stride=(1, 2), padding=(2, 1), dilation=2, bias=True),
    dict(kernel_size=3, stride=1, padding=1, dilation=1, bias=True, padding_mode="reflect"),
    # "same" with an even kernel pads one more after than before (h: 0 + 1, w: 1 + 2 here)
    dict(kernel_size=(2, 4), padding="same", dilation=1, bias=True, padding_mode="reflect"),
    dict(kernel_size=4, stride=1, padding="same", dilation=1, bias=False, padding_mode="circular"),
    dict(kernel_size=(2, 3), stride=1, padding="same", dilation=(1, 2), bias=True),
    dict(kernel_size=3, stride=2, padding="valid", dilation=1, bias=True, padding_mode="reflect"),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's
def test_conv_view_gradient_equals_patch_outer_products(case):
    """dL/dW (as out x in*kh*kw [+1]) == sum over examples and positions of g a^T."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **case).double()
    (v,) = layer_views(conv)
    kh, kw = conv.kernel_size
    assert v.kind == "conv2d" and v.shape == (4, 3 * kh * kw + (1 if case["bias"] else 0))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    seen = {}
    conv.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0]))
    conv.register_full_backward_hook(lambda mod, gi, go: seen.update(go=go[0]))
    g = _grads(conv, x)
    a = v.input_matrix(seen["inp"])
    gm = v.output_grad_matrix(seen["go"])
    assert a.shape[0] == gm.shape[0] == 2 * v.positions(seen["go"])
    torch.testing.assert_close(gm.T @ a, v.to_matrix(g), rtol=1e-10, atol=1e-10)


def test_linear_curvature_matrices_on_sequence_input():
    lin = nn.Linear(4, 2).double()
    (v,) = layer_views(lin)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    seen = {}
    lin.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0]))
    lin.register_full_backward_hook(lambda mod, gi, go: seen.update(go=go[0]))
    g = _grads(lin, x)
    a, gm = v.input_matrix(seen["inp"]), v.output_grad_matrix(seen["go"])
    assert a.shape == (15, 5) and torch.all(a[:, -1] == 1)
    torch.testing.assert_close(gm.T @ a, v.to_matrix(g))


def test_fallback_views_and_skip():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model.emb = nn.Embedding(7, 2)
    views = layer_views(model)
    kinds = {v.name: v.kind for v in views}
    assert kinds == {
        "0": "conv2d",
        "1.weight": "diag",
        "1.bias": "diag",
        "2.weight": "diag",  # grouped conv
        "2.bias": "diag",
        "4": "linear",
        "emb.weight": "diag",
    }
    covered = [p for v in views for p in v.params]
    assert covered == [n for n, _ in model.named_parameters()]
    skipped = layer_views(model, skip=r"^4\.weight$|emb")
    names = {v.name: v for v in skipped}
    assert "emb.weight" not in names and "4" not in names
    assert names["4.bias"].kind == "diag"  # the bias of a skipped linear falls back


def test_frozen_parameters_are_left_out():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    m[0].weight.requires_grad_(False)
    names = [v.name for v in layer_views(m)]
    assert names == ["0.bias", "1"]
