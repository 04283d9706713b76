"""metaopt: meta-learned optimizers (APO, MetaMD) on a shared Kronecker-preconditioner core."""

__version__ = "0.1.0"

from metaopt.io import load_preconditioner, save_preconditioner  # noqa: E402
from metaopt.kron import KroneckerPreconditioner  # noqa: E402
from metaopt.learners import APO, APOConfig, MetaMD  # noqa: E402
from metaopt.objectives import MetaContext, register_meta_objective  # noqa: E402

__all__ = [
    "APO",
    "APOConfig",
    "KroneckerPreconditioner",
    "MetaContext",
    "MetaMD",
    "__version__",
    "load_preconditioner",
    "register_meta_objective",
    "save_preconditioner",
]
