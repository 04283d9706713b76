"""The shared Kronecker-preconditioner core: layer views, families, the preconditioner."""

from metaopt.kron.families import (
    FAMILIES,
    DiagFamily,
    EKFACFamily,
    Family,
    LowRankFamily,
    ScalarFamily,
    available_families,
    family_options,
    make_family,
    register_family,
    resolve_family,
)
from metaopt.kron.layers import LayerView, layer_views
from metaopt.kron.preconditioner import KroneckerPreconditioner

__all__ = [
    "FAMILIES",
    "DiagFamily",
    "EKFACFamily",
    "Family",
    "KroneckerPreconditioner",
    "LayerView",
    "LowRankFamily",
    "ScalarFamily",
    "available_families",
    "family_options",
    "layer_views",
    "make_family",
    "register_family",
    "resolve_family",
]
