"""The built-in learners, registered lazily (nothing heavy is imported until used)."""

from meta_train.learners import register_learner

register_learner(
    "metamd",
    "meta_train.builders:build_metamd",
    description="MetaMD: Kronecker Bregman divergence, implicit hypergradients",
)
register_learner(
    "metasgd",
    "meta_train.builders:build_metasgd",
    description="Meta-SGD: per-parameter learning rates, truncated unrolled hypergradients",
)
register_learner(
    "metacurvature",
    "meta_train.builders:build_metacurvature",
    description="Meta-Curvature: Kronecker transform without inverse, unrolled hypergradients",
)
register_learner(
    "apo",
    "meta_train.online:build_apo",
    distributed=False,
    description="APO-Precond run online through the training domains in turn",
)
