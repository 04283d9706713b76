"""MetaMD (Meta Mirror Descent, Gao, Gouk, Lee & Hospedales) and its competitors: offline
meta-learners of an optimizer (a preconditioner composed with an update rule) across a
distribution of tasks, deployed on new tasks as an ordinary ``torch.optim`` optimizer::

    learner = metaopt.MetaMD(suite.meta_train_tasks("75"))      # preset "kron-adamw"
    learned = learner.meta_train(300)
    metaopt.save_learned_optimizer(learned, "learned.safetensors")
    opt = metaopt.load_optimizer("learned.safetensors", new_model)   # torch.optim.Optimizer

Presets (:data:`PRESETS`): ``"kron-adamw"`` (default), ``"metamd-paper"`` (the paper's
Eq. 8 + Neumann + rank-1 mirror descent), ``"metasgd"``, ``"metacurvature"``.
"""

from metaopt.learners.metamd.config import PRESETS, MetaMDConfig, preset_config
from metaopt.learners.metamd.learner import MetaMD, draw_generator

__all__ = ["PRESETS", "MetaMD", "MetaMDConfig", "draw_generator", "preset_config"]
