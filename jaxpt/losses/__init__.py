"""Pure loss functions on arrays: `loss, metrics = <method>_loss(...)`. No models, no config objects; all jittable
and differentiable, so they compose (`dpo + 0.1 * sft`) in your own steps. Metrics are means; with
`return_counts=True` they are `(sum, count)` pairs that add up over micro-batches (`jaxpt.losses.metrics`)."""

from jaxpt.losses.distillation import distillation_loss, distillation_loss_from_hidden, generalized_jsd
from jaxpt.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from jaxpt.losses.grpo import GRPO_LOSS_TYPES, grpo_advantages, grpo_loss
from jaxpt.losses.kto import kto_loss
from jaxpt.losses.logprobs import (
    chunked_token_logps,
    entropy_from_logits,
    masked_mean,
    next_token_targets,
    token_logps,
    weighted_nll_from_hidden,
)
from jaxpt.losses.reward import reward_loss
from jaxpt.losses.rloo import rloo_advantages, rloo_loss
from jaxpt.losses.sampler_mismatch import sampler_importance_weights
from jaxpt.losses.sft import SFT_LOSS_TYPES, sft_loss, sft_loss_from_hidden

__all__ = [
    "DPO_LOSS_TYPES", "GRPO_LOSS_TYPES", "SFT_LOSS_TYPES", "chunked_token_logps", "distillation_loss",
    "distillation_loss_from_hidden", "dpo_loss", "entropy_from_logits",
    "generalized_jsd", "grpo_advantages", "grpo_loss", "kto_loss", "masked_mean", "next_token_targets", "reward_loss",
    "rloo_advantages", "rloo_loss", "sampler_importance_weights", "sft_loss", "sft_loss_from_hidden", "token_logps",
    "weighted_nll_from_hidden",
]
