"""PPO for language models (Schulman et al. 2017, arXiv:1707.06347; as in RLHF, Ouyang et al. 2022,
arXiv:2203.02155, and "The N Implementation Details of RLHF with PPO", Huang et al. 2024, arXiv:2403.17031):
`PPOConfig`, the pure pieces (`kl_penalized_rewards`, `gae_advantages`, `masked_whiten`, `ppo_loss`), the rollout,
`make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

TRL had this as `PPOTrainer` / `PPOConfig` (removed before 1.16); config names, defaults, the order of the
computations and the metric names follow it. One *update* (TRL's `global_step`, jaxpt's `step` in
`metrics.jsonl`, `max_steps`):

1. sample one completion (`response_length` tokens at most, `temperature`) for each of `batch_size` prompts, score
   it with the reward functions / reward model (`objective/scores`), minus `missing_eos_penalty` when it did not
   end with EOS;
2. with the parameters before the update: the policy's and the reference's per-token log-probs and the value
   model's per-token values;
3. per-token rewards: `-kl_coef * KL` on every completion token (k1 `log π - log π_ref`, or k3), plus the score at
   the token after the last one (TRL's placement: the value model sees the EOS there; at the last token when the
   completion fills `response_length`); optionally whitened (`whiten_rewards`, mean kept);
4. GAE (`gamma`, `lam`) over the completion, returns = advantages + values, advantages whitened over the
   completion tokens;
5. `num_ppo_epochs` passes over the rollout, each shuffled and cut into `num_mini_batches` mini-batches of
   `per_device_train_batch_size x devices x gradient_accumulation_steps` completions, one optimizer step per
   mini-batch on `pg_loss + vf_coef * vf_loss` (clipped ratio `cliprange`, clipped values `cliprange_value`).

The policy and the value model train together (one optimizer, as TRL's `PolicyAndValueWrapper`): the train state
holds a `PolicyAndValue` module. The value model is a sequence classifier with one output (`from_pretrained(path,
num_labels=1)`, usually the reward model's checkpoint) whose `score` head is applied to every token. The reference
is a frozen copy of the initial policy (or `ref_model`).

LoRA (`--use_peft`, `jaxpt.lora.apply_lora`): each model trains what its own adapters say. As TRL's PPOTrainer
with a `peft_config` (adapters on the policy only, `PolicyAndValueWrapper` training the value model whole), a
policy with adapters trains only them (dropout as every method's step, `jaxpt.lora.value_and_grad`) and its base
stays frozen; the reference is then that base with the adapters off (no second copy), unless `ref_model` is given,
and the policy is exported as its adapter in peft's format (`final/adapter_config.json`, merged too with
`merge_adapter_on_save`). The value model trains in full, as TRL's, unless it has adapters of its own
(`apply_lora` on it: its adapters and its `score` head, peft's SEQ_CLS `modules_to_save`), then exported as its
adapter to `value_model/`. `jaxpt ppo --use_peft` puts adapters on the policy (TRL's choice). A quantized base
(QLoRA) is not supported here yet.

```python
config = PPOConfig(output_dir="out", max_steps=100, response_length=32)
value_model = jaxpt.models.from_pretrained("reward_dir", num_labels=1)
result = jaxpt.experimental.ppo.train(policy, tokenizer, prompts, config, value_model=value_model,
                                      reward_funcs=[jaxpt.rewards.model_reward(reward_model, tokenizer)])
```

Normalisation: each optimizer step's losses are means over all completion tokens of its mini-batch (the policy
loss) and over the tokens with a value (the value loss), so `batch 8 x accumulation 1 == batch 2 x accumulation 4`;
TRL averages per-micro-batch means (equal without accumulation). The per-token metrics (`policy/approxkl_avg`,
`val/ratio`, `policy/entropy_avg`) are means over completion tokens, where TRL's also count the padding of the
batch; `objective/entropy` sums `-log π` over completion tokens only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpt import data, distributed, loop, lora
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.losses.logprobs import chunked_token_logps
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import save_pretrained, set_gradient_checkpointing
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import check_reference_dtypes, check_rollout_inputs, completion_metrics, sample_and_score
from jaxpt.sharding import batch_divisor, host_array, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class PPOConfig(TrainingConfig):
    """TRL's (pre-1.16) `PPOConfig` / `OnPolicyConfig` fields that have a meaning here (same names and defaults).
    `max_steps` / `num_train_epochs` count updates (rollouts), like TRL's `global_step`; `total_episodes` (TRL's way)
    sets their number from completions instead. Completions end at the EOS token (TRL's `stop_token="eos"`)."""

    learning_rate: float = field(default=3e-6, metadata={"help": "Peak learning rate (TRL's PPO default)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per pass; a rollout "
                                                               "holds num_mini_batches x per_device_train_batch_size "
                                                               "x devices x gradient_accumulation_steps prompts."})
    total_episodes: int | None = field(default=None, metadata={"help": "Completions to train on in all (sets the "
                                                                       "number of updates; default: max_steps or "
                                                                       "num_train_epochs)."})
    response_length: int = field(default=53, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last this many prompt tokens "
                                                                          "(jaxpt; None: no truncation)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (also scales the training "
                                                              "log-probs, as TRL)."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                                                              "completion that did not end with EOS "
                                                                              "(None: none)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (mean kept) before "
                                                                  "GAE."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": "'k1' (log π - log π_ref) or 'k3' ((r - 1) - log r, "
                                                              "r = π_ref / π): J. Schulman's KL estimators."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the values around the old ones."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "λ of GAE."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})

    def validate(self) -> None:
        super().validate()
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "logits_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes={self.total_episodes} must be >= 1 (or None: use max_steps).")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; use 'k1' or 'k3'.")
        for name in ("kl_coef", "cliprange", "vf_coef", "cliprange_value"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")


# --------------------------------------------------------------------------------------------------------------
# Pure pieces: rewards, GAE, whitening, loss (arrays [batch, response_length])
# --------------------------------------------------------------------------------------------------------------


def masked_whiten(values: jax.Array, mask: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """`(values - mean) / sqrt(var + 1e-8)` with the mean and the unbiased variance over `mask`; with
    `shift_mean=False` the mean is added back (only the scale changes)."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    mean = jnp.sum(values * mask) / jnp.maximum(count, 1.0)
    variance = jnp.sum((values - mean) ** 2 * mask) / jnp.maximum(count, 1.0)
    variance = variance * jnp.where(count > 1, count / jnp.maximum(count - 1, 1.0), 1.0)  # Bessel's correction
    whitened = (values - mean) * jax.lax.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def response_masks(lengths: jax.Array, response_length: int) -> tuple[jax.Array, jax.Array]:
    """`(response_mask, value_mask)` `[batch, response_length]` from the generated lengths (EOS included): the
    completion's tokens, and those plus the one after the last (the position whose value predicts the score, TRL's
    `~padding_mask_p1`)."""
    positions = jnp.arange(response_length)[None, :]
    lengths = jnp.asarray(lengths)[:, None]
    return positions < lengths, positions < lengths + 1


def kl_penalized_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, lengths: jax.Array, *,
                         kl_coef: float, kl_estimator: str = "k1") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token rewards `[batch, T]` of RLHF's PPO: `-kl_coef * kl_t` on every completion token, with
    `kl_t = log π - log π_ref` (k1) or `(r - 1) - log r`, `r = π_ref / π` (k3), plus the sequence's `score` at
    position `length` (the one after the last token; `length - 1` when the completion fills all T positions).
    Returns `(rewards, kl, non_score_reward)`, the last two `[batch, T]` and 0 off the completion."""
    response_mask, _ = response_masks(lengths, logprobs.shape[1])
    log_ratio = jnp.where(response_mask, ref_logprobs - logprobs, 0.0)  # log(π_ref / π)
    kl = -log_ratio if kl_estimator == "k1" else jnp.expm1(log_ratio) - log_ratio
    non_score_reward = -kl_coef * kl
    lengths = jnp.asarray(lengths)
    end = jnp.where(lengths < logprobs.shape[1], lengths, lengths - 1)  # [batch]
    at_end = jnp.arange(logprobs.shape[1])[None, :] == end[:, None]
    rewards = non_score_reward + jnp.where(at_end, jnp.asarray(scores, jnp.float32)[:, None], 0.0)
    return rewards, kl, non_score_reward


def gae_advantages(rewards: jax.Array, values: jax.Array, *, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) over the positions of `[batch, T]`
    rewards and values (0 past the end), backwards from the last:

        δ_t = r_t + γ V_{t+1} - V_t   (V_T = 0),     A_t = δ_t + γ λ A_{t+1}

    Returns `(advantages, returns = advantages + values)`."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def backwards(carry, delta):  # delta: [batch] of one position
        advantage = delta + gamma * lam * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(backwards, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T
    return advantages, advantages + values


def ppo_loss(
    logprobs: jax.Array,
    values: jax.Array,
    old_logprobs: jax.Array,
    old_values: jax.Array,
    advantages: jax.Array,
    returns: jax.Array,
    response_mask: jax.Array,
    value_mask: jax.Array,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    num_response_tokens: jax.Array | float | None = None,
    num_value_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """PPO's clipped objectives (arXiv:1707.06347, eq. 7; the value clipping of OpenAI's baselines) on per-token
    `[batch, T]` inputs:

        ratio = exp(log π - log π_old)
        pg_loss = mean_response max(-A ratio, -A clip(ratio, 1 - cliprange, 1 + cliprange))
        vf_loss = 0.5 mean_value max((V - R)², (clip(V, V_old ± cliprange_value) - R)²)
        loss = pg_loss + vf_coef vf_loss

    means over `response_mask` / `value_mask`, normalised by `num_response_tokens` / `num_value_tokens` (default:
    this batch's) so that micro-batches of one step add up. Metrics (TRL's per-step statistics): `pg_loss`,
    `vf_loss`, `pg_clipfrac`, `vf_clipfrac`, `approxkl` (0.5 (log ratio)²), `ratio`, as means or `(sum, count)`
    pairs with `return_counts`."""
    response_mask = response_mask.astype(jnp.float32)
    value_mask = value_mask.astype(jnp.float32)
    num_response_tokens = jnp.sum(response_mask) if num_response_tokens is None else num_response_tokens
    num_value_tokens = jnp.sum(value_mask) if num_value_tokens is None else num_value_tokens
    values = values * value_mask  # TRL zeroes the predictions past the value positions
    clipped_values = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = jnp.square(values - returns)
    vf_losses_clipped = jnp.square(clipped_values - returns)
    vf_sum = 0.5 * jnp.sum(jnp.maximum(vf_losses, vf_losses_clipped) * value_mask)
    log_ratio = (logprobs - old_logprobs) * response_mask
    ratio = jnp.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_sum = jnp.sum(jnp.maximum(pg_losses, pg_losses_clipped) * response_mask)
    pg_loss = pg_sum / jnp.maximum(num_response_tokens, 1.0)
    vf_loss = vf_sum / jnp.maximum(num_value_tokens, 1.0)
    loss = pg_loss + vf_coef * vf_loss

    stop = jax.lax.stop_gradient
    response_count, value_count = jnp.sum(response_mask), jnp.sum(value_mask)
    metrics: MetricPairs = {
        "pg_loss": (stop(pg_sum), response_count),
        "vf_loss": (stop(vf_sum), value_count),
        "pg_clipfrac": sum_and_count(stop((pg_losses_clipped > pg_losses).astype(jnp.float32)), response_mask),
        "vf_clipfrac": sum_and_count(stop((vf_losses_clipped > vf_losses).astype(jnp.float32)), value_mask),
        "approxkl": sum_and_count(stop(0.5 * jnp.square(log_ratio)), response_mask),
        "ratio": sum_and_count(stop(ratio), response_mask),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class PolicyAndValue(nnx.Module):
    """The policy (a causal LM) and the value model (a one-output classifier) trained by one optimizer."""

    def __init__(self, policy: nnx.Module, value_model: nnx.Module):
        self.policy = policy
        self.value_model = value_model
        # each family's rules match the parameter names under either attribute (regexes search the dotted name)
        self.partition_rules = (*getattr(policy, "partition_rules", ()), *getattr(value_model, "partition_rules", ()))

    def trainable_parameters(self):
        """The nnx filter of what trains (read by `jaxpt.lora.trainable_filter`): each model's own part, all of its
        parameters, or with LoRA adapters its adapters and `modules_to_save`."""
        from jaxpt.lora import trainable_filter

        parts = {name: nnx.filterlib.to_predicate(trainable_filter(getattr(self, name)))
                 for name in ("policy", "value_model")}

        def trains(path, value) -> bool:
            part = parts.get(str(path[0])) if path else None
            return part is not None and part(path[1:], value)

        return trains


def check_value_model(value_model: nnx.Module) -> None:
    if getattr(value_model, "num_labels", None) != 1 or not hasattr(value_model, "score"):
        raise ValueError(f"PPO's value model must be a sequence classifier with one output, but it is a "
                         f"{type(value_model).__name__} (num_labels={getattr(value_model, 'num_labels', None)}): "
                         "load it with jaxpt.models.from_pretrained(path, num_labels=1) (usually the reward model).")


def reference_params(state: TrainState, ref_model: nnx.Module | None = None) -> nnx.State:
    """The reference policy's parameters (the policy's graph): `ref_model`'s, or a copy of the initial policy; under
    LoRA the policy's base with its adapters off (zeros of `lora_b`, copies of `lora_a`; the frozen base itself, no
    copy) or `ref_model` joined with them. Copies of what trains: the step donates `state.params`."""
    trained = state.params["policy"]
    frozen = state.frozen["policy"] if state.frozen is not None and "policy" in state.frozen else None
    if frozen is None:  # the policy trains in full
        return nnx.state(ref_model, nnx.Param) if ref_model is not None else jax.tree.map(jnp.copy, trained)
    adapters_off = jax.tree.map(jnp.copy, lora.without_adapters(nnx.filter_state(trained, lora.LoRAParam)))
    if ref_model is not None:
        return nnx.merge_state(adapters_off, nnx.state(ref_model, nnx.Param))
    return nnx.merge_state(frozen, adapters_off)


def _sequence(batch: dict) -> tuple[jax.Array, jax.Array, int, int]:
    input_ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=-1)
    attention_mask = jnp.concatenate([batch["prompt_mask"], batch["attention_mask"]], axis=-1)
    return input_ids, attention_mask, batch["prompt_ids"].shape[-1], batch["completion_ids"].shape[-1]


def policy_logprobs(policy: nnx.Module, batch: dict, *, temperature: float, chunk_size: int):
    """`(logprobs, entropy)` `[batch, T]` of the completion tokens under `softmax(logits / temperature)`, from the
    final hidden states in chunks (never full logits)."""
    input_ids, attention_mask, prompt_length, length = _sequence(batch)
    hidden = policy.hidden_states(input_ids, attention_mask=attention_mask)
    predicting = hidden[:, prompt_length - 1: prompt_length + length - 1]  # the positions that predict them
    return chunked_token_logps(predicting, policy.lm_head_weight(), batch["completion_ids"], chunk_size=chunk_size,
                               logit_softcap=policy.final_logit_softcap, temperature=temperature, return_entropy=True)


def token_values(value_model: nnx.Module, batch: dict) -> jax.Array:
    """`[batch, T]`: the value head on the hidden state before each completion token (the state that chooses
    it), position t + 1 past the last token being the state after it."""
    input_ids, attention_mask, prompt_length, length = _sequence(batch)
    hidden = value_model.model(input_ids, attention_mask=attention_mask)
    values = value_model.score(hidden[:, prompt_length - 1: prompt_length + length - 1])
    return values[..., 0].astype(jnp.float32)


# --------------------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Sampling:
    """What `jaxpt.rollout.sample_and_score` reads from a config: one completion per prompt, PPO's settings."""

    max_completion_length: int
    temperature: float
    num_generations: int = 1
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    mask_truncated_completions: bool = False


@dataclass
class _PolicyView:
    """The policy part of the train state, as the sampler reads a state (`graphdef`, `full_params()`)."""

    graphdef: nnx.GraphDef
    params: nnx.State

    def full_params(self) -> nnx.State:
        return self.params


def make_rollout_forward(graphdef: nnx.GraphDef, policy_graphdef: nnx.GraphDef, config: PPOConfig, *,
                         micro_batch: int, mesh=None) -> Callable:
    """`forward(params, ref_params, arrays) -> (logprobs, ref_logprobs, values)` numpy `[n, T]`: the policy's and
    the reference's log-probs (the very function the train step differentiates) and the values, micro-batch by
    micro-batch, without gradient."""

    def compute(params, ref_params, batch):
        model = nnx.merge(graphdef, params)
        options = dict(temperature=config.temperature, chunk_size=config.logits_chunk_size)
        logprobs, _ = policy_logprobs(model.policy, batch, **options)
        ref_logprobs, _ = policy_logprobs(nnx.merge(policy_graphdef, ref_params), batch, **options)
        return logprobs, ref_logprobs, token_values(model.value_model, batch)

    def compute_in_mesh(params, ref_params, batch):
        if mesh is None:
            return compute(params, ref_params, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return compute(params, ref_params, batch)

    jitted = jax.jit(compute_in_mesh)

    def forward(params, ref_params, arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "attention_mask")
        outputs = []
        for start in range(0, len(arrays["prompt_ids"]), micro_batch):
            batch = shard_batch({k: arrays[k][start:start + micro_batch] for k in keys}, mesh, global_batch=True,
                                check_shapes=False)  # the whole rollout is on every process: same shapes
            outputs.append([host_array(x) for x in jitted(params, ref_params, batch)])
        return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))

    return forward


def rollout(state: TrainState, policy_graphdef: nnx.GraphDef, ref_params: nnx.State, prompts: Sequence[dict],
            reward_funcs: Sequence[Callable], tokenizer, config: PPOConfig, *, forward: Callable, key: jax.Array,
            mesh, prompt_buckets: Sequence[int]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sample and score one completion per prompt, then steps 2-4 of an update (module docstring). Returns the
    arrays the optimizer steps consume (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`,
    `logprobs`, `values`, `advantages`, `returns`, `response_mask`, `value_mask`) and the rollout's metrics."""
    policy = _PolicyView(policy_graphdef, state.full_params()["policy"])
    sampling = _Sampling(max_completion_length=config.response_length, temperature=config.temperature)
    sampled = sample_and_score(policy, prompts, reward_funcs, tokenizer, sampling, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets)
    if np.isnan(sampled.rewards).all(axis=1).any():
        logger.warning("Some completions got no reward from any reward function (None); their score is 0.")
    scores = np.nansum(sampled.rewards, axis=1).astype(np.float32)
    finished = np.asarray(sampled.finished, bool)
    if config.missing_eos_penalty is not None:
        scores = scores - np.float32(config.missing_eos_penalty) * (~finished)
    arrays = {k: sampled.arrays[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "attention_mask")}
    logprobs, ref_logprobs, values = forward(state.full_params(), ref_params, arrays)
    lengths = arrays["attention_mask"].sum(1)
    advantages, returns, rollout_metrics, masks = _advantages(scores, logprobs, ref_logprobs, values, lengths, config)
    arrays.update(logprobs=logprobs, values=np.asarray(values * masks[1]), advantages=advantages, returns=returns,
                  response_mask=masks[0].astype(np.int32), value_mask=masks[1].astype(np.int32))
    eos = tokenizer.eos_token_id
    rollout_metrics["val/num_eos_tokens"] = float(np.sum((arrays["completion_ids"] == eos) & (masks[0] > 0)))
    rollout_metrics.update(completion_metrics(sampled.lengths, finished))
    return arrays, rollout_metrics


@functools.partial(jax.jit, static_argnames=("kl_coef", "kl_estimator", "whiten_rewards", "gamma", "lam"))
def _advantages_jit(scores, logprobs, ref_logprobs, values, lengths, *, kl_coef, kl_estimator, whiten_rewards,
                    gamma, lam):
    response_mask, value_mask = response_masks(lengths, logprobs.shape[1])
    rewards, kl, non_score_reward = kl_penalized_rewards(scores, logprobs, ref_logprobs, lengths, kl_coef=kl_coef,
                                                         kl_estimator=kl_estimator)
    if whiten_rewards:
        rewards = jnp.where(value_mask, masked_whiten(rewards, value_mask, shift_mean=False), 0.0)
    values = jnp.where(value_mask, values, 0.0)
    advantages, returns = gae_advantages(rewards, values, gamma=gamma, lam=lam)
    advantages = jnp.where(response_mask, masked_whiten(advantages, response_mask), 0.0)
    metrics = {"objective/kl": jnp.mean(jnp.sum(kl, 1)),
               "objective/entropy": jnp.mean(jnp.sum(jnp.where(response_mask, -logprobs, 0.0), 1)),
               "objective/non_score_reward": jnp.mean(jnp.sum(non_score_reward, 1)),
               "objective/scores": jnp.mean(scores)}
    metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
    return advantages, returns, metrics, (response_mask, value_mask)


def _advantages(scores, logprobs, ref_logprobs, values, lengths, config: PPOConfig):
    advantages, returns, metrics, masks = jax.device_get(_advantages_jit(
        scores, logprobs, ref_logprobs, values, lengths, kl_coef=config.kl_coef, kl_estimator=config.kl_estimator,
        whiten_rewards=config.whiten_rewards, gamma=config.gamma, lam=config.lam))
    return (np.asarray(advantages), np.asarray(returns), {k: float(v) for k, v in metrics.items()},
            tuple(np.asarray(m) for m in masks))


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: PPOConfig, totals: dict):
    """Loss of one micro-batch normalised by the whole mini-batch's tokens, and its `(sum, count)` metrics."""
    model = nnx.merge(graphdef, params)
    logprobs, entropy = policy_logprobs(model.policy, batch, temperature=config.temperature,
                                        chunk_size=config.logits_chunk_size)
    values = token_values(model.value_model, batch)
    loss, metrics = ppo_loss(logprobs, values, batch["logprobs"], batch["values"], batch["advantages"],
                             batch["returns"], batch["response_mask"], batch["value_mask"],
                             cliprange=config.cliprange, cliprange_value=config.cliprange_value,
                             vf_coef=config.vf_coef, num_response_tokens=totals["response"],
                             num_value_tokens=totals["value"], return_counts=True)
    metrics["entropy"] = sum_and_count(entropy, batch["response_mask"])
    return loss, metrics


def make_train_step(config: PPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step of the policy and the value model on one
    mini-batch of rollout arrays shaped `[accumulation, micro_batch, ...]` (see `rollout`), micro-batches scanned
    inside; jitted with explicit shardings and the state (a `PolicyAndValue`'s) donated. Metrics: `loss`,
    `grad_norm` and the means of `ppo_loss`'s statistics plus `entropy` over the mini-batch."""

    def step(state: TrainState, batch: dict):
        totals = {"response": jnp.sum(batch["response_mask"].astype(jnp.float32)),
                  "value": jnp.sum(batch["value_mask"].astype(jnp.float32))}
        # the trained parameters only (under LoRA the adapters, with their dropout; the frozen base joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config, totals,
                                                 micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# TRL's names of the per-update statistics: (name, per-step metric, reduction over the update's steps)
UPDATE_METRICS = (("policy/approxkl_avg", "approxkl", np.mean), ("policy/clipfrac_avg", "pg_clipfrac", np.mean),
                  ("loss/policy_avg", "pg_loss", np.mean), ("loss/value_avg", "vf_loss", np.mean),
                  ("val/clipfrac_avg", "vf_clipfrac", np.mean), ("policy/entropy_avg", "entropy", np.mean),
                  ("val/ratio", "ratio", np.mean), ("val/ratio_var", "ratio", np.var),
                  ("loss", "loss", np.mean), ("grad_norm", "grad_norm", np.mean))


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: PPOConfig, *, value_model: nnx.Module,
          reward_funcs: Sequence[Callable | str], ref_model: nnx.Module | None = None,
          eval_dataset=None) -> loop.TrainResult:
    """PPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions): the
    policy `model` and the `value_model` (a one-output classifier) train together; `reward_funcs` (callables with
    TRL's signature, names from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`, summed)
    score the completions; the reference is a frozen copy of the initial policy unless `ref_model` is given.
    Progress bar, `metrics.jsonl` (one line per update, TRL's names), evaluation (`eval_objective/scores`: mean
    score of sampled completions on `eval_dataset`), orbax checkpoints at update boundaries, exact resume, and the
    policy exported in Hugging Face format to `output_dir/final` (the value model to `output_dir/value_model`)."""
    from jaxpt.quantize import is_quantized

    config.validate()
    loop.prepare_output_dir(config)
    check_value_model(value_model)
    for name, part in (("policy", model), ("value model", value_model)):
        if is_quantized(part):
            raise ValueError(f"PPO's {name} has a quantized base (load_in_4bit / load_in_8bit): QLoRA is not "
                             "supported by jaxpt.experimental.ppo yet; load it unquantized (--use_peft alone "
                             "trains LoRA adapters).")
    if ref_model is None:
        lora.check_reference_without_adapters(model, method="PPO")
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: PPO needs a reward model (jaxpt.rewards.model_reward) or function.")
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    accumulation = config.gradient_accumulation_steps
    mini_batch = micro_batch * accumulation
    batch_size = mini_batch * config.num_mini_batches  # prompts (= completions) per rollout, TRL's batch_size
    prompts = data.prepare_prompts(dataset, tokenizer, method="PPO", max_prompt_length=config.max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="PPO",
                                            max_prompt_length=config.max_prompt_length)
    distributed.check_same_data(prompts, what="PPO prompts")
    updates_per_epoch = data.steps_per_epoch(len(prompts), batch_size, method="PPO")
    total_updates = (-(-config.total_episodes // batch_size) if config.total_episodes is not None
                     else data.total_steps(config, updates_per_epoch))
    steps_per_update = config.num_ppo_epochs * config.num_mini_batches
    eval_batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    sampling = _Sampling(max_completion_length=config.response_length, temperature=config.temperature)
    check_rollout_inputs(reward_funcs, [model, value_model, ref_model], prompts, eval_prompts, tokenizer, sampling,
                         method="PPO")
    if ref_model is not None:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    tx, schedule = make_optimizer(config, total_updates * steps_per_update)  # TRL: the schedule runs over steps
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    set_gradient_checkpointing(value_model, config.gradient_checkpointing)
    policy_graphdef = nnx.split(model, nnx.Param)[0]
    joint = PolicyAndValue(model, value_model)
    state = TrainState.create(joint, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    ref_params = reference_params(state, ref_model)
    forward = make_rollout_forward(state.graphdef, policy_graphdef, config, micro_batch=micro_batch, mesh=mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="ppo", model=joint)
    state, start_update, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_updates,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="ppo", start_step=start_update, config=config.to_dict())
    order = data.step_indices(len(prompts), batch_size, seed=config.seed, shuffle=True, start_step=start_update)
    base_key = jax.random.key(config.seed)
    started = time.monotonic()
    try:
        for update in range(start_update, total_updates):
            _, indices = next(order)
            arrays, metrics = rollout(state, policy_graphdef, ref_params, [prompts[i] for i in indices], reward_funcs,
                                      tokenizer, config, forward=forward, key=jax.random.fold_in(base_key, update),
                                      mesh=mesh, prompt_buckets=prompt_buckets)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            step_metrics = []
            shuffle = np.random.default_rng([config.seed, update])
            for _ in range(config.num_ppo_epochs):
                permutation = shuffle.permutation(batch_size)
                for first in range(0, batch_size, mini_batch):
                    rows = permutation[first:first + mini_batch]
                    batch = {k: v[rows].reshape(accumulation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
                    placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)
                    state, step_out = train_step(state, placed)
                    step_metrics.append(step_out)
            step_metrics = jax.device_get(step_metrics)
            for name, key, reduce in UPDATE_METRICS:
                metrics[name] = float(reduce([float(m[key]) for m in step_metrics]))
            done = update + 1
            metrics.update({"learning_rate": schedule(done * steps_per_update - 1), "num_tokens": num_tokens,
                            "episode": done * batch_size,
                            "eps": (done - start_update) * batch_size / max(time.monotonic() - started, 1e-9)})
            log.log(done, metrics, epoch=done / updates_per_epoch)
            if eval_prompts and loop.should_evaluate(config, done, updates_per_epoch):
                log.write({"step": done, **evaluate(state, policy_graphdef, eval_prompts, reward_funcs, tokenizer,
                                                    config, key=jax.random.key(config.seed + 1), mesh=mesh,
                                                    prompt_buckets=prompt_buckets, batch_size=eval_batch_size)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_updates, epoch=total_updates / updates_per_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, export(state, tokenizer, config))


def evaluate(state, policy_graphdef, prompts, reward_funcs, tokenizer, config: PPOConfig, *, key, mesh,
             prompt_buckets, batch_size: int) -> dict[str, float]:
    """`eval_objective/scores`: the mean score (with `missing_eos_penalty`) of one sampled completion per eval
    prompt, in rollouts of `batch_size` prompts (`per_device_eval_batch_size x devices`; the last filled up with its
    last prompt, whose copies do not count)."""
    policy = _PolicyView(policy_graphdef, state.full_params()["policy"])
    sampling = _Sampling(max_completion_length=config.response_length, temperature=config.temperature)
    scores = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        sampled = sample_and_score(policy, chunk, reward_funcs, tokenizer, sampling, key=jax.random.fold_in(key, index),
                                   mesh=mesh, prompt_buckets=prompt_buckets)
        score = np.nansum(sampled.rewards, axis=1)
        if config.missing_eos_penalty is not None:
            score = score - config.missing_eos_penalty * (~np.asarray(sampled.finished, bool))
        scores.extend(score[:real].tolist())
    return {"eval_objective/scores": float(np.mean(scores))}


def export(state: TrainState, tokenizer, config: PPOConfig) -> str | None:
    """The trained policy to `output_dir/final` (what TRL saves) and the value model to `output_dir/value_model`,
    in Hugging Face format, with the tokenizer; a model with LoRA adapters as its adapter in peft's format, and with
    `merge_adapter_on_save` also merged into a full checkpoint in `<directory>_merged`."""
    if not config.save_final_model:
        return None
    model = state.model()
    directory = Path(config.output_dir) / "final"
    written = []
    for part, path in ((model.policy, directory), (model.value_model, Path(config.output_dir) / "value_model")):
        written.append(path)
        if not lora.has_adapters(part):
            save_pretrained(part, path)
            continue
        lora.save_adapter(part, path)
        if getattr(config, "merge_adapter_on_save", False):
            # a model of its own (new variables): merging in place would change the train state's model
            graphdef, params = nnx.split(part, nnx.Param)
            merged = lora.merge_adapter(nnx.merge(graphdef, jax.tree.map(lambda x: x, params)))
            save_pretrained(merged, path.with_name(path.name + "_merged"))
            written.append(path.with_name(path.name + "_merged"))
    if tokenizer is not None and jax.process_index() == 0:
        for path in written:
            tokenizer.save_pretrained(path)
    return str(directory)

