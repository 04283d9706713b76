"""metaopt: meta-learned optimizers (APO, MetaMD) on a shared Kronecker-preconditioner core."""

__version__ = "0.2.0"

from metaopt.io import (  # noqa: E402
    load_learned_optimizer,
    load_optimizer,
    load_preconditioner,
    read_metadata,
    save_learned_optimizer,
    save_preconditioner,
)
from metaopt.kron import KroneckerPreconditioner  # noqa: E402
from metaopt.learners import (  # noqa: E402
    APO,
    PRESETS,
    APOConfig,
    MetaCurvature,
    MetaLearner,
    MetaMD,
    MetaMDConfig,
    MetaSGD,
    MetaStep,
)
from metaopt.objectives import MetaContext, register_meta_objective  # noqa: E402
from metaopt.optim import LearnedOptimizer, Preconditioned  # noqa: E402

__all__ = [
    "APO",
    "PRESETS",
    "APOConfig",
    "KroneckerPreconditioner",
    "LearnedOptimizer",
    "MetaContext",
    "MetaCurvature",
    "MetaLearner",
    "MetaMD",
    "MetaMDConfig",
    "MetaSGD",
    "MetaStep",
    "Preconditioned",
    "__version__",
    "load_learned_optimizer",
    "load_optimizer",
    "load_preconditioner",
    "read_metadata",
    "register_meta_objective",
    "save_learned_optimizer",
    "save_preconditioner",
]
