"""jaxpt: post-training for language models in pure JAX (SFT, DPO, reward modelling, KTO, GRPO, RLOO,
distillation).

Stable surface: `jaxpt.models` (from_pretrained / save_pretrained), `jaxpt.losses` (pure losses), one module
per method (`jaxpt.sft`, `jaxpt.dpo`, `jaxpt.reward`, `jaxpt.kto`, `jaxpt.grpo`, `jaxpt.rloo`: config, data,
`make_train_step`, `train`), `jaxpt.TrainState`, `jaxpt.sharding`, `jaxpt.distributed` (multi-process set-up),
`jaxpt.sampling`, `jaxpt.rewards`; `jaxpt.distillation` (teacher-to-student, TRL's DistillationTrainer).
New methods land in `jaxpt.experimental` without a stability promise.
"""

import jaxpt.distillation as distillation
from jaxpt import distributed, dpo, grpo, kto, lora, losses, models, reward, rewards, rloo, sampling, sft, sharding
from jaxpt.train_state import TrainState, make_optimizer

__version__ = "0.1.0"

__all__ = ["TrainState", "distributed", "dpo", "grpo", "kto", "lora", "losses", "make_optimizer", "models",
           "reward", "rewards", "rloo", "sampling", "sft", "sharding"]
__all__ += ["distillation"]
