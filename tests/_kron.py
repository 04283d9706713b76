"""Helpers shared by the Kronecker-family tests: random meta-parameters, flattened tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def randomize(module: nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Add ``scale`` times a seeded standard normal draw to every parameter of ``module``,
    moving it off its identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def vec(tensors: dict[str, Tensor], names: list[str]) -> Tensor:
    """The tensors named ``names``, each flattened row-major, concatenated in that order."""
    return torch.cat([tensors[n].reshape(-1) for n in names])
