"""Functional evaluation helpers against the model's own forward and autograd."""

import torch
from torch import nn

from metaopt.func import detached_params, functional_forward, loss_and_grads


def test_functional_forward_uses_given_params_and_keeps_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.eval()
    x = torch.randn(5, 3)
    params = {n: p.detach() * 2 for n, p in model.named_parameters()}
    out = functional_forward(model)(params, x)
    # oracle: the same network with its weights doubled by hand
    twin = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    torch.testing.assert_close(out, twin(x))
    assert not torch.equal(out, model(x))


def test_loss_and_grads_match_backward():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss, grads = loss_and_grads(
        functional_forward(model), nn.functional.cross_entropy, detached_params(model), (x, y)
    )
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)
    assert not loss.requires_grad


def test_create_graph_gives_second_derivatives():
    # f(w) = sum((w x)^2) / 2 ; d/dw of ||grad||^2 has the closed form 2 H g
    w = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    params = {"weight": w}
    _, grads = loss_and_grads(
        functional_forward(model),
        lambda out, y: 0.5 * out.pow(2).sum(),
        params,
        (x, None),
        create_graph=True,
    )
    (d,) = torch.autograd.grad(grads["weight"].pow(2).sum(), [w])
    hess = x.T @ x
    g = w.detach() @ hess
    torch.testing.assert_close(d, 2 * g @ hess)
