"""SDPO, Self-Distillation Policy Optimization (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation",
arXiv:2601.20802): `SDPOConfig`, the pure losses, rollouts with teacher contexts, `make_train_step`, `train`.
Experimental: no stability promise (see `jaxpt.experimental`). TRL 1.16 has it as
`trl.experimental.sdpo.SDPOTrainer`; names, defaults and metrics follow it.

The policy samples `num_generations` completions per prompt, the reward functions score them, and each completion
gets a *teacher context*: its prompt rewritten with a successful completion of the same group (reward >=
`success_reward_threshold`, another one than itself with `dont_reprompt_on_self_success`) and, optionally, the
environment's feedback (a `privileged_context` column). The teacher, the model itself (`teacher_model_kind`: `ema`
an exponential moving average of the policy, `base` the initial policy, `live` the current one, no gradient), reads
that context followed by the same completion, and its next-token distributions supervise the policy's (which read
the plain prompt) token by token: a dense, feedback-informed signal with no external teacher. Completions without a
demonstration or feedback get no distillation signal (`self_distillation_mask` 0). The loss mixes the distillation
term with a GRPO-style clipped policy gradient on the group-relative advantages:

    L = (1 - distillation_weight) * L_policy + distillation_weight * L_distill

```python
config = SDPOConfig(output_dir="out", num_generations=8, max_completion_length=64, max_steps=100)
result = jaxpt.experimental.sdpo.train(model, tokenizer, prompts_dataset, config, reward_funcs=[my_reward])

step = jaxpt.experimental.sdpo.make_train_step(config)        # or your own loop
state, metrics = step(state, batch, teacher_params)           # teacher_params None: the live policy
```

Batch (`[accumulation, micro_batch, ...]`): `prompt_ids`/`prompt_mask` (left-padded), `teacher_prompt_ids`/
`teacher_prompt_mask` (the teacher contexts, left-padded), `completion_ids`/`attention_mask`/`completion_mask`
(right-padded), `advantages` `[micro_batch]`, `self_distillation_mask` `[micro_batch]`, and `old_logps` when a
rollout feeds several optimizer steps (as TRL: then the distillation term is importance-weighted by the clipped
ratio current / rollout-time policy, `distillation_is_clip`). The divergence is computed a chunk of tokens at a time
from both models' final hidden states (`self_distillation_from_hidden`), so no `[tokens, vocab]` logits exist for
the batch. Normalisation is over the whole accumulated batch, so `batch 8 x accumulation 1 == batch 2 x
accumulation 4`.

Differences from TRL, all where TRL's numbers depend on the micro-batch split: TRL averages each micro-batch's loss
(its `dapo`/`bnpo` policy term over the micro-batch's tokens) and its metrics over micro-batches; here the step's
rows/tokens normalise (identical with `gradient_accumulation_steps=1`, which the parity tests use). TRL's `beta`
(declared but unused by its loss), the vLLM / teacher-server options and the `diagnostics_*` warnings are not here.
"""

from __future__ import annotations

import logging
import re
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
from jaxpt.losses.distillation import generalized_jsd
from jaxpt.losses.grpo import grpo_advantages
from jaxpt.losses.logprobs import _on_own_rows, _row_chunks, chunked_token_logps, token_logps
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampled_rewards import combine_rewards
from jaxpt.models import set_gradient_checkpointing
from jaxpt.models.layers import LoRAParam
from jaxpt.reference_sync import mix_reference
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    append_jsonl,
    check_rollout_inputs,
    completion_metrics,
    evaluate_rollouts,
    make_logps_fn,
    reference_params,
    rollout_shape,
    sample_and_score,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")
TEACHER_MODEL_KINDS = ("ema", "base", "live")
SDPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class SDPOConfig(TrainingConfig):
    """TRL 1.16's `SDPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's default)."})
    # the online policy objective
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group size)."})
    max_completion_length: int = field(default=256, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt tokens "
                                                                         "(None: no truncation)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; also divides both models' "
                                                              "logits in the losses (TRL)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per rollout (default: "
                                                                              "per_device_train_batch_size x devices "
                                                                              "x steps_per_generation)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per rollout (default: "
                                                                             "gradient_accumulation_steps)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the policy ratio (1 - epsilon)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping (default: epsilon)."})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' or 'sequence' (GSPO) ratios "
                                                                              "in the policy term."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: 1 each)."})
    scale_rewards: str = field(default="group", metadata={"help": f"One of {SCALE_REWARDS}: advantages divided by "
                                                                  "the group's / batch's reward std, or not."})
    loss_type: str = field(default="dapo", metadata={"help": f"Policy-term aggregation, one of {SDPO_LOSS_TYPES}."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions cut at "
                                                                              "max_completion_length out of the "
                                                                              "loss."})
    # the SDPO loss
    distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term in [0, 1] "
                                                                      "(1: pure self-distillation, 0: the policy "
                                                                      "gradient alone)."})
    distillation_alpha: float = field(default=1.0, metadata={"help": "Divergence interpolation: 0 forward KL(teacher "
                                                                     "|| student), 1 reverse KL(student || teacher), "
                                                                     "in between the generalized JSD."})
    distillation_mode: str = field(default="sampled_token", metadata={"help": f"One of {DISTILLATION_MODES}: the "
                                                                              "sampled tokens' log-ratio (needs "
                                                                              "distillation_alpha=1), the whole "
                                                                              "vocabulary, or the student's top-k."})
    distillation_topk: int | None = field(default=None, metadata={"help": "k of distillation_mode='topk_logits' "
                                                                          "(set only then)."})
    distillation_is_clip: float | None = field(default=2.0, metadata={"help": "Cap of the importance ratio that "
                                                                              "weights the distillation term when "
                                                                              "the rollout is off-policy (None: no "
                                                                              "weighting)."})
    distillation_add_tail: bool = field(default=False, metadata={"help": "topk_logits: add a bucket for the mass "
                                                                         "outside the top k (else renormalise)."})
    # the teacher
    teacher_model_kind: str = field(default="ema", metadata={"help": f"One of {TEACHER_MODEL_KINDS}: a moving "
                                                                     "average of the policy, the initial policy, or "
                                                                     "the current one."})
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA rate: teacher <- rate * policy + (1 - "
                                                                       "rate) * teacher."})
    teacher_sync_steps: int = field(default=1, metadata={"help": "Optimizer steps between EMA updates."})
    # reprompting
    use_successful_as_teacher: bool = field(default=True, metadata={"help": "Show the teacher a successful "
                                                                            "completion of the same group."})
    success_reward_threshold: float = field(default=1.0, metadata={"help": "Reward at or above which a completion "
                                                                           "is a successful demonstration."})
    dont_reprompt_on_self_success: bool = field(default=True, metadata={"help": "Never show a completion itself "
                                                                                "as its demonstration."})
    max_reprompt_len: int = field(default=10240, metadata={"help": "Keep the last this many tokens of a teacher "
                                                                   "context."})
    reprompt_template: str = field(default="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
                                   metadata={"help": "The teacher context ({prompt}, {solution}, {feedback})."})
    solution_template: str = field(default="\nCorrect solution:\n\n{successful_previous_attempt}\n\n",
                                   metadata={"help": "How the demonstration is shown ({successful_previous_attempt})."})
    feedback_template: str = field(default="\nThe following is feedback from your unsuccessful earlier attempt:"
                                           "\n\n{feedback_raw}\n\n",
                                   metadata={"help": "How environment feedback is shown ({feedback_raw})."})
    include_environment_feedback: bool = field(default=False, metadata={"help": "Show the teacher the dataset's "
                                                                                "`privileged_context` feedback."})
    environment_feedback_only_without_solution: bool = field(default=False, metadata={
        "help": "Use the feedback only for completions that have no demonstration."})
    remove_thinking_from_demonstration: bool = field(default=False, metadata={"help": "Drop <think>...</think> "
                                                                                      "from demonstrations."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every rollout's prompts, completions, "
                                                                   "rewards and teacher contexts to "
                                                                   "output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when comparing the two "
                                                                   "distributions (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        choices = {"distillation_mode": DISTILLATION_MODES, "teacher_model_kind": TEACHER_MODEL_KINDS,
                   "loss_type": SDPO_LOSS_TYPES, "scale_rewards": SCALE_REWARDS,
                   "importance_sampling_level": ("token", "sequence")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {allowed}.")
        if not 0.0 <= self.distillation_weight <= 1.0:
            raise ValueError(f"distillation_weight={self.distillation_weight} must be in [0, 1].")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha={self.distillation_alpha} must be in [0, 1] (0: forward KL, "
                             "1: reverse KL).")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ValueError(f"distillation_mode='sampled_token' is reverse KL only: it needs distillation_alpha=1.0, "
                             f"got {self.distillation_alpha}. Use distillation_mode='full_logits' or 'topk_logits' "
                             "for another alpha.")
        if (self.distillation_mode == "topk_logits") != (self.distillation_topk is not None):
            raise ValueError(f"distillation_topk={self.distillation_topk} with distillation_mode="
                             f"{self.distillation_mode!r}: set distillation_topk (>= 1) exactly when the mode is "
                             "'topk_logits'.")
        if self.distillation_topk is not None and self.distillation_topk < 1:
            raise ValueError(f"distillation_topk={self.distillation_topk} must be >= 1.")
        if self.distillation_is_clip is not None and self.distillation_is_clip <= 0:
            raise ValueError(f"distillation_is_clip={self.distillation_is_clip} must be > 0 (or None: off).")
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate={self.teacher_update_rate} must be in [0, 1].")
        if self.teacher_sync_steps < 1:
            raise ValueError(f"teacher_sync_steps={self.teacher_sync_steps} must be >= 1.")
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: SDPO needs at least 2 completions per prompt "
                             "(demonstrations and advantages come from the group).")
        if self.max_completion_length < 1 or self.num_iterations < 1 or self.max_reprompt_len < 1:
            raise ValueError("max_completion_length, num_iterations and max_reprompt_len must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.epsilon < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon={self.epsilon} and epsilon_high={self.epsilon_high} must be >= 0.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")
        for name, template, keys in (("reprompt_template", self.reprompt_template, ("prompt", "solution", "feedback")),
                                     ("solution_template", self.solution_template, ("successful_previous_attempt",)),
                                     ("feedback_template", self.feedback_template, ("feedback_raw",))):
            try:
                template.format(**{key: "" for key in keys})
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"{name}={template!r} is not a template of {keys}: {error!r}.") from None
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Loss (pure functions on arrays)
# --------------------------------------------------------------------------------------------------------------


def _with_tail_bucket(logps: jax.Array) -> jax.Array:
    """Top-k log-probs `[..., k]` (summing to the captured mass P <= 1) and one more entry, log(1 - P)."""
    captured = jnp.minimum(jax.nn.logsumexp(logps, axis=-1, keepdims=True), -1e-7)
    return jnp.concatenate([logps, jnp.log(-jnp.expm1(captured))], axis=-1)


def self_distillation_divergence(student_logits: jax.Array, teacher_logits: jax.Array, completion_ids: jax.Array, *,
                                 distillation_mode: str = "sampled_token", distillation_alpha: float = 1.0,
                                 distillation_topk: int | None = None,
                                 distillation_add_tail: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-token self-distillation loss and the student's log-prob of each sampled token, both `[...]` float32,
    from logits `[..., vocab]` (already divided by the temperature) at the positions predicting `completion_ids`.

    With p_s, p_t the student's and teacher's next-token distributions and y the sampled token:

        sampled_token:  stop_grad(log p_s(y) - log p_t(y)) * log p_s(y)     (a reverse-KL estimator; alpha = 1)
        full_logits:    D_alpha(p_s, p_t) over the vocabulary
        topk_logits:    D_alpha over the student's top-k tokens, both distributions renormalised on them, or with one
                        more bucket for the rest of the mass (`distillation_add_tail`)

    D_alpha: alpha = 0 KL(p_t || p_s), alpha = 1 KL(p_s || p_t), else with m = (1 - alpha) p_s + alpha p_t,
    (1 - alpha) KL(p_s || m) + alpha KL(p_t || m) (`jaxpt.losses.distillation.generalized_jsd`). The teacher is a
    constant (stop_gradient). SDPO: Hübotter et al. 2026, arXiv:2601.20802; SDFT: Shenfeld et al. 2026,
    arXiv:2601.19897."""
    student_logits = student_logits.astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    student_logps = token_logps(student_logits, completion_ids)
    if distillation_mode == "sampled_token":
        if distillation_alpha != 1.0:
            raise ValueError(f"distillation_mode='sampled_token' needs distillation_alpha=1.0 (reverse KL), got "
                             f"{distillation_alpha}.")
        teacher_logps = token_logps(teacher_logits, completion_ids)
        return jax.lax.stop_gradient(student_logps - teacher_logps) * student_logps, student_logps
    if distillation_mode == "full_logits":
        student, teacher = student_logits, teacher_logits
    elif distillation_mode == "topk_logits":
        if distillation_topk is None or not 1 <= distillation_topk <= student_logits.shape[-1]:
            raise ValueError(f"distillation_topk={distillation_topk} must be in [1, vocab={student_logits.shape[-1]}] "
                             "for distillation_mode='topk_logits'.")
        top_student, top_ids = jax.lax.top_k(student_logits, distillation_topk)
        student = top_student - jax.nn.logsumexp(student_logits, axis=-1, keepdims=True)
        teacher = (jnp.take_along_axis(teacher_logits, top_ids, axis=-1)
                   - jax.nn.logsumexp(teacher_logits, axis=-1, keepdims=True))
        if distillation_add_tail:
            student, teacher = _with_tail_bucket(student), _with_tail_bucket(teacher)
        # else generalized_jsd's log-softmax renormalises both on the top k
    else:
        raise ValueError(f"distillation_mode={distillation_mode!r}; use one of {DISTILLATION_MODES}.")
    # log-softmax of (normalised) log-probs changes neither the value nor the gradient: the sum of their exps is
    # constant, so the projection it adds is orthogonal to the divergence's gradient.
    divergence, _ = generalized_jsd(student, teacher, beta=distillation_alpha, temperature=1.0)
    return divergence, student_logps


def _project(hidden_chunk, weight, logit_softcap, temperature):
    """float32 logits `[chunk, vocab]` of one chunk, softcapped (Gemma 2), divided by the temperature."""
    logits = jax.lax.dot_general(hidden_chunk, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits / temperature


def self_distillation_from_hidden(student_hidden_states: jax.Array, student_lm_head_weight: jax.Array,
                                  teacher_hidden_states: jax.Array, teacher_lm_head_weight: jax.Array,
                                  completion_ids: jax.Array, *, distillation_mode: str = "sampled_token",
                                  distillation_alpha: float = 1.0, distillation_topk: int | None = None,
                                  distillation_add_tail: bool = False, temperature: float = 1.0,
                                  student_logit_softcap: float | None = None,
                                  teacher_logit_softcap: float | None = None,
                                  chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """`self_distillation_divergence` from final hidden states (student `[batch, seq, hidden]` with its output
    projection `[vocab, hidden]`, the teacher's likewise, aligned on the completion tokens), about `chunk_size`
    tokens at a time (per device under a mesh), each chunk's logits recomputed in the backward pass: `[tokens,
    vocab]` logits exist for one chunk of each model at a time, never for the batch."""
    temperature = float(temperature)
    compute_dtype = student_hidden_states.dtype

    def one_chunk(student_chunk, teacher_chunk, ids_chunk, student_weight, teacher_weight):
        return self_distillation_divergence(
            _project(student_chunk, student_weight, student_logit_softcap, temperature),
            _project(teacher_chunk, teacher_weight, teacher_logit_softcap, temperature), ids_chunk,
            distillation_mode=distillation_mode, distillation_alpha=distillation_alpha,
            distillation_topk=distillation_topk, distillation_add_tail=distillation_add_tail)

    one_chunk = jax.checkpoint(one_chunk)  # keep only the chunk's inputs; the backward pass projects it again

    def local(student_hidden, teacher_hidden, ids, student_weight, teacher_weight):
        student_chunks, teacher_chunks, id_chunks, unchunked = _row_chunks(
            chunk_size, student_hidden, teacher_hidden.astype(compute_dtype), ids.astype(jnp.int32))

        def scan_body(_, chunks):
            return None, one_chunk(*chunks, student_weight, teacher_weight)

        _, (per_token, logps) = jax.lax.scan(scan_body, None, (student_chunks, teacher_chunks, id_chunks))
        return unchunked(per_token), unchunked(logps)

    teacher_hidden = jax.lax.stop_gradient(teacher_hidden_states)
    teacher_weight = jax.lax.stop_gradient(teacher_lm_head_weight)
    return _on_own_rows(local, (student_hidden_states, teacher_hidden, completion_ids),
                        (student_lm_head_weight, teacher_weight), compute_dtype)


def importance_clipped(per_token_loss: jax.Array, logps: jax.Array, old_logps: jax.Array,
                       clip: float) -> jax.Array:
    """`per_token_loss * min(exp(clip_[-20, 20](log p - log p_old)), clip)`, the ratio a constant (TRL's
    `apply_importance_sampling_clipping`)."""
    log_ratio = jnp.clip(jax.lax.stop_gradient(logps - old_logps), -20.0, 20.0)
    return per_token_loss * jnp.minimum(jnp.exp(log_ratio), clip)


def sdpo_loss(
    distillation_per_token: jax.Array,
    logps: jax.Array,
    old_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    self_distillation_mask: jax.Array | None = None,
    distillation_weight: float = 1.0,
    distillation_is_clip: float | None = 2.0,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_sequences: jax.Array | float | None = None,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """SDPO's loss from per-token arrays `[batch, seq]`: `distillation_per_token` (`self_distillation_divergence`),
    the policy's `logps` of the sampled tokens, `old_logps` (None: on-policy, old = stop_gradient(logps), and no
    importance weight on the distillation term, as TRL), per-sequence `advantages` `[batch]`, `completion_mask`, and
    `self_distillation_mask` `[batch]` (1 where the teacher had a demonstration or feedback; None: all 1).

        L = (1 - w) L_policy + w L_distill,   w = distillation_weight
        L_distill = (1/B) sum_i [sum_t m_it rho_it d_it / max(sum_t m_it, 1)],   m = completion_mask * sd_mask,
                    rho = min(exp(log p - log p_old), distillation_is_clip) (a constant; 1 when on-policy)
        L_policy  = GRPO's clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps_high) A), r = exp(log p - log p_old)
                    (per sequence with importance_sampling_level="sequence"), aggregated by `loss_type`: grpo (per-
                    sequence means), bnpo / dapo (over tokens), dr_grpo (over B x max_completion_length)

    Hübotter et al. 2026, arXiv:2601.20802. `num_sequences` / `num_tokens`: the whole accumulated batch's rows and
    completion tokens (default: this batch's), so micro-batch losses add up to the big batch's. Metrics (TRL's
    names): `self_distillation/distillation_loss` and `sdpo/distillation_loss` (the token mean of rho d over m) when
    w > 0, `self_distillation/policy_loss` when w < 1; `(sum, count)` pairs with `return_counts`."""
    if loss_type not in SDPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; use one of {SDPO_LOSS_TYPES}.")
    if not 0.0 <= distillation_weight <= 1.0:
        raise ValueError(f"distillation_weight={distillation_weight} must be in [0, 1].")
    completion_mask = completion_mask.astype(jnp.float32)
    rows = completion_mask.shape[0]
    num_sequences = jnp.asarray(rows if num_sequences is None else num_sequences, jnp.float32)
    loss, metrics = jnp.zeros((), jnp.float32), {}
    weight = (jnp.asarray(rows, jnp.float32), num_sequences)  # this batch's share of the step, for per-step metrics
    if distillation_weight > 0.0:
        distill_mask = completion_mask
        if self_distillation_mask is not None:
            distill_mask = completion_mask * self_distillation_mask.astype(jnp.float32)[:, None]
        per_token = distillation_per_token
        if distillation_is_clip is not None and old_logps is not None:
            per_token = importance_clipped(per_token, logps, old_logps, distillation_is_clip)
        per_sequence = jnp.sum(per_token * distill_mask, axis=-1) / jnp.maximum(jnp.sum(distill_mask, axis=-1), 1.0)
        loss = loss + distillation_weight * jnp.sum(per_sequence) / num_sequences
        pair = sum_and_count(jax.lax.stop_gradient(per_token), distill_mask)
        metrics["self_distillation/distillation_loss"] = pair
        metrics["sdpo/distillation_loss"] = pair
    if distillation_weight < 1.0:
        policy = _policy_loss(logps, old_logps, advantages, completion_mask, loss_type=loss_type, epsilon=epsilon,
                              epsilon_high=epsilon if epsilon_high is None else epsilon_high,
                              importance_sampling_level=importance_sampling_level,
                              max_completion_length=max_completion_length, num_sequences=num_sequences,
                              num_tokens=num_tokens)
        loss = loss + (1.0 - distillation_weight) * policy
        # the step's policy loss is the sum of its micro-batches' parts: each counts its share of the rows
        metrics["self_distillation/policy_loss"] = (jax.lax.stop_gradient(policy) * weight[1], weight[0])
    return loss, metrics if return_counts else mean_metrics(metrics)


def _policy_loss(logps, old_logps, advantages, completion_mask, *, loss_type, epsilon, epsilon_high,
                 importance_sampling_level, max_completion_length, num_sequences, num_tokens):
    """TRL's SDPO policy term (`SDPOTrainer._compute_policy_loss`), normalised by the whole step's rows/tokens."""
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * completion_mask, axis=-1, keepdims=True)
                     / jnp.maximum(jnp.sum(completion_mask, axis=-1, keepdims=True), 1.0))
    ratio = jnp.exp(log_ratio)
    advantages = advantages[:, None]
    per_token = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages)
    masked = per_token * completion_mask
    if loss_type == "grpo":
        return jnp.sum(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(completion_mask, -1), 1.0)) / num_sequences
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        return jnp.sum(masked) / (num_sequences * max_completion_length)
    tokens = jnp.sum(completion_mask) if num_tokens is None else num_tokens  # bnpo, dapo
    return jnp.sum(masked) / jnp.maximum(jnp.asarray(tokens, jnp.float32), 1.0)


# --------------------------------------------------------------------------------------------------------------
# Rollouts: sample, reward, teacher contexts
# --------------------------------------------------------------------------------------------------------------


def _last_user_text(messages: list[dict]) -> str:
    last = messages[-1]
    if last.get("role") != "user":
        raise ValueError(f"SDPO rewrites the last user message of a conversational prompt for the teacher, but this "
                         f"prompt ends with a {last.get('role')!r} message: end every prompt with a user turn.")
    content = last.get("content", "")
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def teacher_contexts(prompts: Sequence, completion_texts: Sequence[str], rewards: np.ndarray,
                     feedbacks: Sequence | None, config: SDPOConfig) -> tuple[list, np.ndarray, dict[str, float]]:
    """The teacher's prompt for each completion of a rollout (groups of `num_generations` contiguous rows), TRL's
    `SuccessfulRolloutTeacherContextBuilder`: the first successful completion of the group (reward >=
    `success_reward_threshold`; not the row itself with `dont_reprompt_on_self_success`) as the demonstration, the
    row's `feedbacks` entry when `include_environment_feedback` (and, with `environment_feedback_only_without_
    solution`, only without a demonstration), through the templates; the original prompt where neither applies.
    Returns `(teacher_prompts, self_distillation_mask [n], metrics)` (TRL's `self_distillation/*` fractions)."""
    group = config.num_generations
    total = len(prompts)
    feedbacks = [None] * total if feedbacks is None else list(feedbacks)
    successful_rows = np.asarray(rewards) >= config.success_reward_threshold
    mask = np.zeros(total, np.float32)
    teacher_prompts = []
    with_solution = feedback_available = feedback_used = success_groups = 0
    for i in range(total):
        start = (i // group) * group
        demo = None
        if config.use_successful_as_teacher:
            demo = next((j for j in range(start, start + group) if successful_rows[j]
                         and not (config.dont_reprompt_on_self_success and j == i)), None)
        if i % group == 0 and successful_rows[start:start + group].any():
            success_groups += 1
        feedback = feedbacks[i]
        has_feedback = isinstance(feedback, str) and feedback.strip() != ""
        feedback_available += has_feedback
        use_feedback = (config.include_environment_feedback and has_feedback
                        and not (config.environment_feedback_only_without_solution and demo is not None))
        feedback_used += use_feedback
        with_solution += demo is not None
        if demo is None and not use_feedback:
            teacher_prompts.append(prompts[i])
            continue
        mask[i] = 1.0
        solution = ""
        if demo is not None:
            text = completion_texts[demo]
            if config.remove_thinking_from_demonstration:
                text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
            solution = config.solution_template.format(successful_previous_attempt=text)
        feedback_text = config.feedback_template.format(feedback_raw=feedback) if use_feedback else ""
        prompt = prompts[i]
        if isinstance(prompt, str):
            teacher_prompts.append(config.reprompt_template.format(prompt=prompt, solution=solution,
                                                                   feedback=feedback_text))
        else:
            text = config.reprompt_template.format(prompt=_last_user_text(prompt), solution=solution,
                                                   feedback=feedback_text)
            teacher_prompts.append(list(prompt[:-1]) + [{"role": "user", "content": text}])
    metrics = {"self_distillation/success_group_fraction": success_groups / max(1, total // group),
               "self_distillation/success_sample_fraction": with_solution / max(total, 1),
               "self_distillation/feedback_available_fraction": feedback_available / max(total, 1),
               "self_distillation/feedback_used_fraction": feedback_used / max(total, 1),
               "self_distillation/reprompt_sample_fraction": float(mask.mean()) if total else 0.0}
    return teacher_prompts, mask, metrics


def reward_diagnostics(rewards: np.ndarray, per_function: np.ndarray, reward_names: Sequence[str], *,
                       num_generations: int, scale_rewards: str) -> dict[str, float]:
    """TRL's `self_distillation/reward_*` metrics of a rollout's total rewards `[n]` (and each function's mean)."""
    rewards = np.asarray(rewards, np.float64)
    if scale_rewards == "none":
        group_std = np.ones(len(rewards) // num_generations)
    else:
        group_std = rewards.reshape(-1, num_generations).std(axis=1, ddof=1)
    metrics = {"self_distillation/reward_mean": rewards.mean(),
               "self_distillation/reward_std": rewards.std(ddof=1) if rewards.size > 1 else 0.0,
               "self_distillation/reward_min": rewards.min(), "self_distillation/reward_max": rewards.max(),
               "self_distillation/group_reward_std_mean": group_std.mean(),
               "self_distillation/flat_group_fraction": (group_std <= 1e-8).mean()}
    for name, column in zip(reward_names, np.asarray(per_function, np.float64).T, strict=True):
        metrics[f"self_distillation/rewards/{name}"] = np.nanmean(column)
    return {k: float(v) for k, v in metrics.items()}


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: SDPOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn=None,
            policy_logps_fn=None):
    """Sample `num_generations` completions per prompt (`data.prepare_prompts` records), score them, compute the
    group-relative advantages and the teacher contexts. Returns `(arrays, metrics, records)`: the numpy arrays `[n,
    ...]` of the batch layout (module docstring), the rollout's metrics and per-completion records.
    `policy_logps_fn` (`rollout.make_logps_fn`): given, the arrays get `old_logps` (a rollout feeding several
    optimizer steps). `ref_logps_fn` must be None (SDPO has no reference model; the argument is
    `evaluate_rollouts`')."""
    if ref_logps_fn is not None:
        raise ValueError("SDPO has no reference model: ref_logps_fn must be None.")
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets)
    arrays = dict(sampled.arrays)
    arrays.pop("sampler_logps")
    weights = config.reward_weights
    total = np.nan_to_num(np.asarray(combine_rewards(sampled.rewards, weights)), nan=0.0)  # TRL: nansum
    arrays["advantages"] = np.asarray(grpo_advantages(total, num_generations=config.num_generations,
                                                      scale_rewards=config.scale_rewards), np.float32)
    lengths = arrays["attention_mask"].sum(axis=1)
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(arrays["completion_ids"], lengths, strict=True)],
                                   skip_special_tokens=True)
    repeated = [p for p in prompts for _ in range(config.num_generations)]
    feedbacks = [p["columns"].get("privileged_context") for p in repeated]
    teacher_prompts, sd_mask, context_metrics = teacher_contexts([p["prompt"] for p in repeated], texts, total,
                                                                 feedbacks, config)
    arrays["self_distillation_mask"] = sd_mask
    arrays.update(_teacher_prompt_arrays(teacher_prompts, tokenizer, config))
    _check_teacher_fits(state, arrays["teacher_prompt_mask"].sum(axis=1) + lengths)
    if policy_logps_fn is not None:
        arrays["old_logps"] = policy_logps_fn(state.full_params(), arrays)
    metrics = reward_diagnostics(total, sampled.rewards, sampled.reward_names, num_generations=config.num_generations,
                                 scale_rewards=config.scale_rewards)
    metrics.update(context_metrics)
    metrics.update(completion_metrics(sampled.lengths, sampled.finished))
    records = [{**r, "teacher_prompt": t, "self_distillation": bool(m)}
               for r, t, m in zip(sampled.records(arrays["advantages"]), teacher_prompts, sd_mask, strict=True)]
    return arrays, metrics, records


def _teacher_prompt_arrays(teacher_prompts: Sequence, tokenizer, config) -> dict:
    """Teacher contexts -> `teacher_prompt_ids`/`teacher_prompt_mask` `[n, bucket]`, left-padded to one of the
    length buckets up to `max_reprompt_len` (each context keeps its last `max_reprompt_len` tokens)."""
    conversational = not isinstance(teacher_prompts[0], str)
    ids = [data.tokenize(tokenizer, p, add_generation_prompt=conversational)["input_ids"][-config.max_reprompt_len:]
           for p in teacher_prompts]
    longest = max(map(len, ids))
    buckets = data.length_buckets(max(config.max_reprompt_len, 16), min_length=16)
    length = data.bucket_length(longest, buckets)
    return {"teacher_prompt_ids": data.pad_rows(ids, length, data.pad_token_id(tokenizer), left=True),
            "teacher_prompt_mask": data.pad_rows([[1] * len(row) for row in ids], length, 0, left=True)}


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _completion_hidden(model: nnx.Module, prompt_ids, prompt_mask, batch: dict) -> jax.Array:
    """Final hidden states at the positions that predict the completion tokens `[batch, completion_len, hidden]`,
    after the given (left-padded) prompt."""
    prompt_length = prompt_ids.shape[-1]
    completion_length = batch["completion_ids"].shape[-1]
    input_ids = jnp.concatenate([prompt_ids, batch["completion_ids"]], axis=-1)
    attention_mask = jnp.concatenate([prompt_mask, batch["attention_mask"]], axis=-1)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    return hidden[:, prompt_length - 1: prompt_length + completion_length - 1]


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, teacher_params: nnx.State | None, batch: dict,
            config: SDPOConfig, totals: dict):
    """Loss of one micro-batch, normalised by the whole step's rows/tokens (`totals`), and its metrics as `(sum,
    count)` pairs. `teacher_params` None: the live policy (`params`, no gradient) is the teacher."""
    student = nnx.merge(graphdef, params)
    student_hidden = _completion_hidden(student, batch["prompt_ids"], batch["prompt_mask"], batch)
    if config.distillation_weight > 0.0:
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(params if teacher_params is None else teacher_params))
        teacher_hidden = jax.lax.stop_gradient(
            _completion_hidden(teacher, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], batch))
        per_token, logps = self_distillation_from_hidden(
            student_hidden, student.lm_head_weight(), teacher_hidden, teacher.lm_head_weight(), batch["completion_ids"],
            distillation_mode=config.distillation_mode, distillation_alpha=config.distillation_alpha,
            distillation_topk=config.distillation_topk, distillation_add_tail=config.distillation_add_tail,
            temperature=config.temperature, student_logit_softcap=student.final_logit_softcap,
            teacher_logit_softcap=teacher.final_logit_softcap, chunk_size=config.logits_chunk_size)
    else:  # the policy gradient alone: no teacher forward
        logps = chunked_token_logps(student_hidden, student.lm_head_weight(), batch["completion_ids"],
                                    chunk_size=config.logits_chunk_size, logit_softcap=student.final_logit_softcap,
                                    temperature=config.temperature)
        per_token = jnp.zeros_like(logps)
    return sdpo_loss(per_token, logps, batch.get("old_logps"), batch["advantages"], batch["completion_mask"],
                     self_distillation_mask=batch["self_distillation_mask"],
                     distillation_weight=config.distillation_weight, distillation_is_clip=config.distillation_is_clip,
                     loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                     importance_sampling_level=config.importance_sampling_level,
                     max_completion_length=config.max_completion_length, num_sequences=totals["sequences"],
                     num_tokens=totals["tokens"], return_counts=True)


def make_train_step(config: SDPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    teacher_sharding: Any = None):
    """`state, metrics = step(state, batch, teacher_params)`: one optimizer step over arrays shaped `[accumulation,
    micro_batch, ...]` (module docstring), micro-batches scanned inside. `teacher_params`: full parameters for the
    policy's graph (`teacher_params(...)`), laid out by `teacher_sharding` on a mesh, or None for the live policy.
    jitted with explicit shardings, the state donated."""
    if mesh is not None and teacher_sharding is None and config.teacher_model_kind != "live":
        raise ValueError("make_train_step(mesh=...) needs teacher_sharding (the teacher parameters' shardings).")

    def step(state: TrainState, batch: dict, teacher_params: nnx.State | None):
        totals = {"sequences": jnp.asarray(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1],
                                           jnp.float32),
                  "tokens": jnp.sum(batch["completion_mask"].astype(jnp.float32))}
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, teacher_params, micro_batch,
                                                        config, totals, micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(teacher_sharding,))


# --------------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------------


def initial_teacher(state: TrainState, kind: str):
    """What the teacher keeps for `kind`: `None` for `live`; for `base` the initial parameters (under LoRA the
    adapters switched off); for `ema` the averaged trained parameters, starting from the initial ones (under LoRA
    from zero adapters, TRL's `PEFTAdapterEMACallback`)."""
    if kind == "live":
        return None
    if kind == "base":
        return reference_params(state)
    if state.frozen is None:
        return jax.tree.map(jnp.copy, state.params)  # a copy: the step donates (and so deletes) state.params

    def zero_adapters(path, value):
        return value.replace(jnp.zeros_like(value[...])) if isinstance(value, LoRAParam) else \
            value.replace(jnp.copy(value[...]))

    return jax.tree_util.tree_map_with_path(zero_adapters, state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def teacher_params(state: TrainState, kept, kind: str):
    """The teacher's full parameters for the step (None: the live policy)."""
    if kind == "ema" and state.frozen is not None:
        return state.full_params(kept)  # EMA adapters on the frozen base
    return kept


def update_teacher(kept, state: TrainState, config, *, step: int):
    """After optimizer step `step` (1-based): the EMA moved toward the policy every `teacher_sync_steps` steps,
    `teacher <- teacher_update_rate * policy + (1 - teacher_update_rate) * teacher` (TRL's teacher callbacks)."""
    if config.teacher_model_kind != "ema" or step % config.teacher_sync_steps:
        return kept
    return mix_reference(kept, state.params, config.teacher_update_rate)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def _check_teacher_fits(state: TrainState, teacher_lengths: np.ndarray) -> None:
    """Teacher contexts plus their completions (`teacher_lengths` tokens) must fit the model's positions."""
    model = nnx.merge(state.graphdef, state.full_params())
    limit = getattr(getattr(getattr(model, "config", None), "rope", None), "max_position_embeddings", None)
    longest = int(np.max(teacher_lengths))
    if limit is not None and longest > limit:
        raise ValueError(f"A teacher context plus its completion is {longest} tokens, more than the model's "
                         f"max_position_embeddings={limit}: lower max_reprompt_len or max_completion_length.")


def train(model: nnx.Module, tokenizer, dataset, config: SDPOConfig, *, reward_funcs: Sequence[Callable | str],
          eval_dataset=None) -> loop.TrainResult:
    """SDPO on the prompts of `dataset` (TRL prompt-only format; a `privileged_context` column is the environment
    feedback; other columns go to the reward functions): progress bar, `metrics.jsonl` with TRL's names, evaluation
    (sampled rewards on `eval_dataset`), orbax checkpoints at rollout boundaries, resume, HF export."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: SDPO needs at least one reward function (it picks the successful "
                         "demonstrations and the advantages).")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch, steps_per_generation, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    steps_per_rollout = config.num_iterations * steps_per_generation // accumulation
    prompts = data.prepare_prompts(dataset, tokenizer, method="SDPO", max_prompt_length=config.max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="SDPO",
                                            max_prompt_length=config.max_prompt_length)
    if not config.include_environment_feedback and any(p["columns"].get("privileged_context") for p in prompts):
        logger.warning("SDPO: the data has `privileged_context` feedback but include_environment_feedback=False, so "
                       "the teacher does not see it (set include_environment_feedback=True to use it).")
    distributed.check_same_data(prompts, what="SDPO prompts")  # every process builds the same global batches
    rollouts_per_epoch = data.steps_per_epoch(len(prompts), prompts_per_rollout, method="SDPO")
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model], prompts, eval_prompts, tokenizer, config, method="SDPO")
    vocab = model.lm_head_weight().shape[0]
    if config.distillation_topk is not None and config.distillation_topk > vocab:
        raise ValueError(f"distillation_topk={config.distillation_topk} is more than the model's {vocab} tokens: "
                         f"lower it to at most {vocab}.")

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    kept = initial_teacher(state, config.teacher_model_kind)
    teacher_sharding = None
    if mesh is not None and kept is not None:
        teacher_sharding = jax.tree.map(lambda leaf: leaf.sharding, teacher_params(state, kept,
                                                                                    config.teacher_model_kind))
    logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh) if steps_per_rollout > 1 else None
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="sdpo", model=model)
    # The EMA teacher moves with training: it is saved with each checkpoint and restored on resume
    ema_teacher = config.teacher_model_kind == "ema"
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra={"teacher": kept} if ema_teacher else None)
    if start_step % steps_per_rollout:
        raise ValueError(f"Checkpoint step {start_step} is not at a rollout boundary ({steps_per_rollout} steps per "
                         "rollout).")
    if ema_teacher and progress.get("extra") is not None:
        kept = progress["extra"]["teacher"]
    elif ema_teacher and start_step >= config.teacher_sync_steps:
        raise ValueError(f"SDPO: resuming at step {start_step} with teacher_model_kind='ema' needs the EMA teacher, "
                         "but the checkpoint does not hold it (written by an older jaxpt). Restart the run, or use "
                         "teacher_model_kind='base' or 'live'.")
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="sdpo", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(prompts), prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step // steps_per_rollout)
    base_key = jax.random.key(config.seed)
    step = start_step
    try:
        while step < total_steps:
            _, indices = next(order)
            arrays, rollout_metrics, records = rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, step // steps_per_rollout), mesh=mesh, prompt_buckets=prompt_buckets,
                policy_logps_fn=logps_fn)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl", [{"step": step, **r} for r in records])
            micro_batches = {k: v.reshape(steps_per_generation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            rollout_tokens = int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            for iteration in range(config.num_iterations):
                for first in range(0, steps_per_generation, accumulation):
                    if step >= total_steps:
                        break
                    batch = {k: v[first:first + accumulation] for k, v in micro_batches.items()}
                    note_shape(batch)
                    placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)
                    state, metrics = train_step(state, placed,
                                                teacher_params(state, kept, config.teacher_model_kind))
                    kept = update_teacher(kept, state, config, step=step + 1)
                    if iteration == 0:
                        num_tokens += rollout_tokens * accumulation // steps_per_generation
                    step += 1
                    log.log(step, {**metrics, **rollout_metrics, "learning_rate": schedule(step - 1),
                                   "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate_rollouts(rollout, state, eval_prompts, reward_funcs, tokenizer,
                                                             config, mesh=mesh, prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens},
                                 extra={"teacher": kept} if ema_teacher else None)
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


__all__ = ["SDPOConfig", "self_distillation_divergence", "self_distillation_from_hidden", "sdpo_loss",
           "importance_clipped", "teacher_contexts", "rollout", "loss_fn", "make_train_step", "initial_teacher",
           "teacher_params", "update_teacher", "train"]
