"""The built-in learners (``--learner metamd | metasgd | metacurvature | apo``)."""

from meta_train.builders import build_metacurvature, build_metamd, build_metasgd
from meta_train.learners import register_learner
from meta_train.online import build_apo

register_learner(
    "metamd",
    build_metamd,
    description="MetaMD: Kronecker Bregman divergence, implicit hypergradients",
)
register_learner(
    "metasgd",
    build_metasgd,
    description="Meta-SGD: per-parameter learning rates, truncated unrolled hypergradients",
)
register_learner(
    "metacurvature",
    build_metacurvature,
    description="Meta-Curvature: Kronecker transform without inverse, unrolled hypergradients",
)
register_learner(
    "apo",
    build_apo,
    distributed=False,
    description="APO-Precond run online through the training domains in turn",
)
