"""Synthetic optimisation problems as ordinary ``Task`` objects.

Convention: a synthetic problem is a ``Task`` like any other, so optimizers and learners never
special-case it. The *model* holds the optimisation variables (``task.make_model(seed)``
returns them at their initial point), its forward returns an output, and
``task.loss(model(x), y)`` is the objective. Where the problem is a sum of squares the model
outputs the residual vector and ``y`` holds the target, so the output-space (Gauss-Newton /
proximal) view of APO is the natural one:

* ``"rosenbrock"``: variables ``theta = (x, y)``, start ``(1, -1.5)`` (APO appendix D.1).
  The model returns the residuals ``r = [1 - x, 10 (y - x^2)]`` (one row per input row; the
  inputs are a single dummy example), the target is ``0``, and
  ``loss = sum(r^2) = (1 - x)^2 + 100 (y - x^2)^2``; minimum 0 at ``(1, 1)``.
* ``"ill-conditioned-regression"``: targets ``t = A x`` with ``x ~ N(0, I)`` and
  ``kappa(A) = 1e10`` (APO section 6.1), model ``W2 W1 x`` (``"two-layer-linear"``),
  ``loss = mean over the batch of ||t - W2 W1 x||^2``.
* family ``"meta-quadratics"`` (MetaMD appendix A.1): ``f(theta) = theta^T Q theta - b^T theta``
  in 2D. Written as ``||Q^(1/2) theta - Q^(-1/2) b / 2||^2 + f*`` with
  ``f* = -b^T Q^(-1) b / 4``: the model returns the residual
  ``Q^(1/2) theta - Q^(-1/2) b / 2``, the target is 0, and ``task.loss`` adds ``f*`` back,
  so it equals ``f`` exactly and the reported ``"mse"`` metric is ``(f - f*) / 2``.
* family ``"linear-regression-family"``: least squares ``y = X w + noise`` with one shared
  ill-conditioned input covariance and ``w ~ N(0, I)`` drawn per task; linear model.

Every synthetic task sets ``task.info["synthetic"] = True`` (the harness then selects
hyperparameters on the validation loss, i.e. the objective). All data are
``TensorDataset``s (batches are index gathers, no ``DataLoader``), so the harness can run
tens of thousands of steps cheaply. ``task.info`` holds the closed forms
(``"minimiser"``, ``"minimum"``, ``"A"``, ``"Q"``, ``"b"``, ``"w_true"``, ``"covariance"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tasks.base import Task, TaskFamily
from tasks.registry import register_family, register_task
from tasks.vision_data import model_factory

__all__ = [
    "QUADRATIC_VARIANTS",
    "LinearRegressionFamily",
    "MetaQuadratics",
    "QuadraticVariables",
    "RosenbrockVariables",
    "ill_conditioned_matrix",
    "ill_conditioned_regression",
    "random_orthogonal",
    "regression_task",
    "rosenbrock",
    "squared_error",
    "storage_dtype",
    "with_defaults",
]


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    """``sum_j (output - target)_j^2`` per row, averaged over the ``N`` rows (``(N, ...)``);
    for one output per row this is the mean squared error."""
    return (output - target).pow(2).reshape(output.shape[0], -1).sum(1).mean()


def _dummy(targets: Tensor) -> TensorDataset:
    """One example: a zero input (only its batch dimension is used) and ``targets``."""
    return TensorDataset(torch.zeros(1, 1), targets.reshape(1, -1))


def _variables_task(name: str, model_fn: Any, loss_fn: Any, target: Tensor, **kw: Any) -> Task:
    data = _dummy(target.to(storage_dtype(kw.get("dtype"))))
    return Task(
        name=name,
        model_fn=model_fn,
        loss_fn=loss_fn,
        metric="mse",
        train=data,
        val=data,
        test=data,
        batch_size=1,
        **kw,
    )


# --- Rosenbrock ------------------------------------------------------------------------------
class RosenbrockVariables(nn.Module):
    """``theta = (x, y)``; forward returns the residuals ``[1 - x, 10 (y - x^2)]`` per row."""

    def __init__(self, start: tuple[float, float] = (1.0, -1.5)) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([float(start[0]), float(start[1])]))

    def forward(self, inputs: Tensor) -> Tensor:
        x, y = self.theta[0], self.theta[1]
        r = torch.stack([1 - x, 10 * (y - x * x)])
        return r.unsqueeze(0).expand(inputs.shape[0], 2)


@register_task("rosenbrock")
def rosenbrock(
    start: tuple[float, float] = (1.0, -1.5),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Task:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from ``start`` (APO appendix D.1); the seed of
    ``make_model`` does not matter (the start is fixed)."""
    if len(tuple(start)) != 2:
        raise ValueError(f"start={start!r}: must be a pair (x, y)")
    start = (float(start[0]), float(start[1]))
    return _variables_task(
        "rosenbrock",
        lambda: RosenbrockVariables(start),
        squared_error,
        torch.zeros(2),
        device=device,
        dtype=dtype,
        info={
            "minimiser": torch.tensor([1.0, 1.0]),
            "minimum": 0.0,
            "start": start,
            "synthetic": True,
        },
    )


# --- ill-conditioned regression --------------------------------------------------------------
def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed ``n x n`` orthogonal matrix (float64), QR of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def ill_conditioned_matrix(n: int, condition: float, generator: torch.Generator) -> Tensor:
    """``U diag(s) V^T`` (float64) with ``s`` log-spaced from 1 to ``1 / condition``."""
    s = torch.logspace(0.0, -math.log10(condition), n, dtype=torch.float64)
    return random_orthogonal(n, generator) @ torch.diag(s) @ random_orthogonal(n, generator).T


def _check(name: str, value: Any, low: float = 0.0, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{name}={value!r}: must be a number {'>=' if inclusive else '>'} {low:g}")


def storage_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to store a task's floating data in: ``dtype`` if floating, else float32, so
    a float64 task keeps float64 targets (``BatchStream`` casts inputs only)."""
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


def with_defaults(
    model: Any, model_options: Mapping[str, Any] | None, defaults: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``model_options`` on top of the task's ``defaults[model]`` (named models only)."""
    base = dict(defaults.get(model, {})) if isinstance(model, str) else {}
    return {**base, **dict(model_options or {})}


@register_task("ill-conditioned-regression")
def ill_conditioned_regression(
    dim: int = 10,
    condition: float = 1e10,
    n_train: int = 4096,
    n_val: int = 1024,
    n_test: int = 1024,
    data_seed: int = 0,
    batch_size: int = 128,
    model: Any = "two-layer-linear",
    model_options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Task:
    """t = A x, ``x ~ N(0, I_dim)``, ``kappa(A) = condition`` (APO section 6.1).

    The paper gives neither the dimension nor the sample size; ``dim=10`` and 4096 training
    points are our choice. ``A`` (float64) is in ``task.info["A"]``; the data are stored in
    ``dtype`` (default float32; at float32 the targets' rounding error, ~1e-7 relative,
    exceeds the smallest singular directions of ``A`` -- use ``dtype=torch.float64`` to
    resolve them).
    """
    for key, value in (("dim", dim), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: must be a positive integer")
    _check("condition", condition, 1.0, inclusive=True)
    g = torch.Generator().manual_seed(int(data_seed))
    a = ill_conditioned_matrix(dim, float(condition), g)
    x = torch.randn(n_train + n_val + n_test, dim, generator=g, dtype=torch.float64)
    t = x @ a.T
    x, t = x.to(storage_dtype(dtype)), t.to(storage_dtype(dtype))
    cut = (n_train, n_train + n_val)
    split = [TensorDataset(x[i:j], t[i:j]) for i, j in ((0, cut[0]), cut, (cut[1], None))]
    return Task(
        name="ill-conditioned-regression",
        model_fn=model_factory(model, dim, model_options, input_shape=(dim,)),
        loss_fn=squared_error,
        metric="mse",
        train=split[0],
        val=split[1],
        test=split[2],
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        info={"A": a, "condition": float(condition), "dim": dim, "minimum": 0.0, "synthetic": True},
    )


# --- meta-quadratics ----------------------------------------------------------------------
#: ``variant -> (mean of Q00, mean of Q11)``: the two rows of MetaMD Figure 1.
QUADRATIC_VARIANTS: dict[str, tuple[float, float]] = {"mild": (0.3, 14.0), "severe": (0.02, 14.0)}


class QuadraticVariables(nn.Module):
    """``theta`` (2,) drawn ``N(0, init_std^2 I)``; forward returns the residual
    ``sqrt(q) * theta - b / (2 sqrt(q))`` per row (its squared norm is ``f - f*``).

    ``sqrt_q`` and ``offset`` are float64 buffers (cast with the module), used in
    ``theta``'s dtype.
    """

    def __init__(self, sqrt_q: Tensor, offset: Tensor, init_std: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(sqrt_q.numel()) * init_std)
        self.register_buffer("sqrt_q", sqrt_q.clone())
        self.register_buffer("offset", offset.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        r = self.sqrt_q.to(self.theta.dtype) * self.theta - self.offset.to(self.theta.dtype)
        return r.unsqueeze(0).expand(inputs.shape[0], -1)


class MetaQuadratics(TaskFamily):
    """MetaMD appendix A.1: ``min theta^T Q theta - b^T theta``, ``theta`` in R^2.

    ``Q = diag(Q00, Q11)`` with ``Qii ~ N(mean_i, (q_std_ratio * mean_i)^2)`` (the paper does
    not give the spread; ratio 0.1 is our choice, and draws are clamped to at least
    ``mean_i / 100`` so every task has a minimum), ``b ~ N([1, 1], I)``; the initial point is
    ``make_model(seed)``: ``theta ~ N(0, init_std^2 I)``. ``variant`` ``"mild"`` has means
    (0.3, 14), ``"severe"`` (0.02, 14) (Figure 1 top and bottom rows).
    """

    name = "meta-quadratics"

    def __init__(
        self,
        variant: str = "mild",
        q_std_ratio: float = 0.1,
        init_std: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if variant not in QUADRATIC_VARIANTS:
            raise ValueError(f"variant={variant!r}: must be one of {sorted(QUADRATIC_VARIANTS)}")
        _check("q_std_ratio", q_std_ratio, 0.0, inclusive=True)
        _check("init_std", init_std)
        self.variant = variant
        self.means = torch.tensor(QUADRATIC_VARIANTS[variant], dtype=torch.float64)
        self.q_std_ratio = float(q_std_ratio)
        self.init_std = float(init_std)
        self.device = device
        self.dtype = dtype

    def sample(self, generator: torch.Generator) -> Task:
        noise = torch.randn(2, generator=generator, dtype=torch.float64)
        q = (self.means * (1 + self.q_std_ratio * noise)).clamp_min(self.means / 100)
        b = torch.ones(2, dtype=torch.float64) + torch.randn(
            2, generator=generator, dtype=torch.float64
        )
        return self.task(q, b)

    def task(self, q: Tensor, b: Tensor) -> Task:
        """The task for ``Q = diag(q)`` and ``b`` (both length 2, ``q > 0``)."""
        q = torch.as_tensor(q, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        if q.shape != (2,) or b.shape != (2,) or not bool((q > 0).all()):
            raise ValueError(f"q={q.tolist()}, b={b.tolist()}: need two positive q and two b")
        minimum = float(-(b * b / q).sum() / 4)
        sqrt_q, offset = q.sqrt(), b / (2 * q.sqrt())
        init_std = self.init_std

        def loss(output: Tensor, target: Tensor) -> Tensor:
            return squared_error(output, target) + minimum

        return _variables_task(
            f"meta-quadratics/{self.variant}",
            lambda: QuadraticVariables(sqrt_q, offset, init_std),
            loss,
            torch.zeros(2),
            device=self.device,
            dtype=self.dtype,
            info={
                "Q": torch.diag(q),
                "b": b,
                "minimiser": b / (2 * q),
                "minimum": minimum,
                "variant": self.variant,
                "synthetic": True,
            },
        )


register_family("meta-quadratics")(MetaQuadratics)


# --- linear-regression family ---------------------------------------------------------------
class LinearRegressionFamily(TaskFamily):
    """Least squares ``y = X w + noise`` sharing one ill-conditioned input covariance.

    The covariance ``Sigma = U diag(lambda) U^T`` (``lambda`` log-spaced from 1 to
    ``1 / condition``, ``U`` from ``covariance_seed``) is fixed for the family; each sampled
    task draws ``w ~ N(0, I_dim)``, inputs ``x = Sigma^(1/2) z`` with ``z ~ N(0, I)`` and
    targets ``x^T w + noise_std * eps`` (all from ``generator``). The model is linear
    (``"mlp"`` with ``widths=()``, no bias) so the loss is exactly quadratic with Hessian
    ``2 X^T X / n`` -- the simplest family where a learned preconditioner must pay off.
    """

    name = "linear-regression-family"

    def __init__(
        self,
        dim: int = 20,
        condition: float = 1e3,
        n_train: int = 512,
        n_val: int = 128,
        n_test: int = 128,
        noise_std: float = 0.1,
        covariance_seed: int = 0,
        batch_size: int = 64,
        model: Any = "mlp",
        model_options: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        for key, v in (("dim", dim), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}={v!r}: must be a positive integer")
        _check("condition", condition, 1.0, inclusive=True)
        _check("noise_std", noise_std, 0.0, inclusive=True)
        self.dim, self.sizes = dim, (n_train, n_val, n_test)
        self.noise_std, self.batch_size = float(noise_std), batch_size
        u = random_orthogonal(dim, torch.Generator().manual_seed(int(covariance_seed)))
        lam = torch.logspace(0.0, -math.log10(condition), dim, dtype=torch.float64)
        self.covariance = u @ torch.diag(lam) @ u.T
        self.sqrt_covariance = u @ torch.diag(lam.sqrt()) @ u.T
        options = with_defaults(model, model_options, {"mlp": {"widths": (), "bias": False}})
        self.model_fn = model_factory(model, 1, options, input_shape=(dim,))
        self.device, self.dtype = device, dtype

    def sample(self, generator: torch.Generator) -> Task:
        w = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        n = sum(self.sizes)
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = x @ self.sqrt_covariance
        eps = torch.randn(n, generator=generator, dtype=torch.float64)
        y = (x @ w + self.noise_std * eps).unsqueeze(1)
        info = {"w_true": w, "covariance": self.covariance, "noise_std": self.noise_std,
                "synthetic": True}  # fmt: skip
        return regression_task("linear-regression-family", self.model_fn, x, y, self.sizes,
                               batch_size=self.batch_size, device=self.device, dtype=self.dtype,
                               info=info)  # fmt: skip


def regression_task(
    name: str,
    model_fn: Any,
    x: Tensor,
    y: Tensor,
    sizes: tuple[int, int, int],
    *,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    info: dict[str, Any],
) -> Task:
    """A squared-error regression :class:`Task` on ``(x, y)`` split into consecutive
    ``(train, val, test)`` parts of ``sizes`` (stored in the task's dtype)."""
    x, y = x.to(storage_dtype(dtype)), y.to(storage_dtype(dtype))
    a, b = sizes[0], sizes[0] + sizes[1]
    return Task(
        name=name,
        model_fn=model_fn,
        loss_fn=squared_error,
        metric="mse",
        train=TensorDataset(x[:a], y[:a]),
        val=TensorDataset(x[a:b], y[a:b]),
        test=TensorDataset(x[b:], y[b:]),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        info=info,
    )


register_family("linear-regression-family")(LinearRegressionFamily)
