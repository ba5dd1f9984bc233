"""SDFT, Self-Distillation Fine-Tuning (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning",
arXiv:2601.19897): `SDFTConfig`, the pure loss, data preparation, `make_train_step`, `train`. Experimental: no
stability promise (see `jaxpt.experimental`). TRL 1.16 has it as `trl.experimental.sdft.SDFTTrainer`; names, defaults
and metrics follow it.

On-policy learning from demonstrations without a reward: each example has a `prompt` and a `privileged_context` (a
demonstration, a solution, a document). The policy samples `num_generations` completions of the plain prompt (or,
with `generate_from_teacher`, of the teacher's prompt); the teacher, the model itself conditioned on
`teacher_prompt_template.format(prompt=..., privileged_context=...)` (`teacher_model_kind`: `base` the initial policy,
`ema` a moving average, `live` the current one, no gradient), reads the same completions, and the policy learns to
match its next-token distributions where it only sees the prompt: the demonstration's knowledge is distilled into the
policy on its own samples, which the paper shows forgets less than SFT on the demonstrations.

    L = (1/B) sum_i [sum_t m_it rho_it d_it / max(sum_t m_it, 1)]

with `d` the per-token divergence of `self_distillation_divergence` (default: the generalized JSD with alpha 0.5 on
the student's top-100 tokens), `m` the completion mask without its first `num_loss_tokens_to_skip` tokens, and `rho`
the clipped importance ratio current / rollout-time policy when a rollout feeds several optimizer steps
(`distillation_is_clip`; 1 otherwise, as TRL).

```python
config = SDFTConfig(output_dir="out", max_completion_length=128, max_steps=100)
result = jaxpt.experimental.sdft.train(model, tokenizer, dataset, config)   # prompt + privileged_context rows

step = jaxpt.experimental.sdft.make_train_step(config)                     # or your own loop
state, metrics = step(state, batch, teacher_params)                        # teacher_params None: the live policy
```

Batch (`[accumulation, micro_batch, ...]`): `prompt_ids`/`prompt_mask` and `teacher_prompt_ids`/`teacher_prompt_mask`
(left-padded), `completion_ids`/`attention_mask`/`completion_mask` (right-padded; `completion_mask` is the loss mask),
and `old_logps` when a rollout feeds several optimizer steps. The divergence is computed a chunk of tokens at a time
from both models' final hidden states, so no `[tokens, vocab]` logits exist for the batch; normalisation is over the
whole accumulated batch (`batch 8 x accumulation 1 == batch 2 x accumulation 4`; TRL's loss agrees, its logged
`*/distillation_loss` averages micro-batch means where this one is the step's token mean). SDPO
(`jaxpt.experimental.sdpo`) shares the divergence and the teacher (marked copies). TRL's vLLM / teacher-server
options are not here; `distillation_topk` above the vocabulary is clipped to it (TRL's `torch.topk` would fail).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from jaxpt.losses.logprobs import _on_own_rows, _row_chunks, token_logps
from jaxpt.losses.metrics import MetricPairs, add_metrics, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.models.layers import LoRAParam
from jaxpt.reference_sync import mix_reference
from jaxpt.rollout import (
    append_jsonl,
    completion_metrics,
    eos_token_ids,
    make_logps_fn,
    reference_params,
    rollout_shape,
)
from jaxpt.sampling import generate
from jaxpt.sharding import batch_divisor, host_array, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

# Copied from jaxpt.experimental.sdpo.DISTILLATION_MODES
DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")
# Copied from jaxpt.experimental.sdpo.TEACHER_MODEL_KINDS
TEACHER_MODEL_KINDS = ("ema", "base", "live")


@dataclass
class SDFTConfig(TrainingConfig):
    """TRL 1.16's `SDFTConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's default)."})
    # the SDFT loss
    distillation_alpha: float = field(default=0.5, metadata={"help": "Divergence interpolation: 0 forward KL(teacher "
                                                                     "|| student), 1 reverse KL(student || teacher), "
                                                                     "in between the generalized JSD."})
    distillation_mode: str = field(default="topk_logits", metadata={"help": f"One of {DISTILLATION_MODES}: the "
                                                                            "sampled tokens' log-ratio (needs "
                                                                            "distillation_alpha=1), the whole "
                                                                            "vocabulary, or the student's top-k."})
    distillation_topk: int | None = field(default=100, metadata={"help": "k of distillation_mode='topk_logits' "
                                                                         "(clipped to the vocabulary size)."})
    distillation_is_clip: float | None = field(default=2.0, metadata={"help": "Cap of the importance ratio that "
                                                                              "weights the loss when the rollout is "
                                                                              "off-policy (None: no weighting)."})
    distillation_add_tail: bool = field(default=False, metadata={"help": "topk_logits: add a bucket for the mass "
                                                                         "outside the top k (else renormalise)."})
    num_loss_tokens_to_skip: int = field(default=0, metadata={"help": "Leave the first this many completion tokens "
                                                                      "out of the loss."})
    # the teacher
    teacher_model_kind: str = field(default="base", metadata={"help": f"One of {TEACHER_MODEL_KINDS}: a moving "
                                                                      "average of the policy, the initial policy, or "
                                                                      "the current one."})
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA rate: teacher <- rate * policy + (1 - "
                                                                       "rate) * teacher (1.0: a hard resync)."})
    teacher_sync_steps: int = field(default=1, metadata={"help": "Optimizer steps between teacher updates."})
    generate_from_teacher: bool = field(default=False, metadata={"help": "Sample the completions after the "
                                                                         "teacher's prompt instead of the "
                                                                         "student's."})
    teacher_prompt_template: str = field(default="{prompt}\n\n{privileged_context}", metadata={
        "help": "The teacher's prompt from the student's and the privileged context."})
    # generation
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many tokens of each "
                                                                         "(student and teacher) prompt (None: no "
                                                                         "truncation)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt."})
    max_completion_length: int = field(default=256, metadata={"help": "Tokens generated per completion at most."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; also divides both models' "
                                                              "logits in the loss (TRL)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per rollout (default: "
                                                                              "per_device_train_batch_size x devices "
                                                                              "x steps_per_generation)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per rollout (default: "
                                                                             "gradient_accumulation_steps)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every rollout's prompts and completions "
                                                                   "to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when comparing the two "
                                                                   "distributions (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("distillation_mode", DISTILLATION_MODES), ("teacher_model_kind", TEACHER_MODEL_KINDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {allowed}.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha={self.distillation_alpha} must be in [0, 1] (0: forward KL, "
                             "1: reverse KL).")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ValueError(f"distillation_mode='sampled_token' is reverse KL only: it needs distillation_alpha=1.0, "
                             f"got {self.distillation_alpha}. Use 'full_logits' or 'topk_logits' for another alpha.")
        if self.distillation_mode == "topk_logits" and (self.distillation_topk is None or self.distillation_topk < 1):
            raise ValueError(f"distillation_topk={self.distillation_topk}: distillation_mode='topk_logits' needs "
                             "distillation_topk >= 1.")
        if self.distillation_is_clip is not None and self.distillation_is_clip <= 0:
            raise ValueError(f"distillation_is_clip={self.distillation_is_clip} must be > 0 (or None: off).")
        if self.num_loss_tokens_to_skip < 0:
            raise ValueError(f"num_loss_tokens_to_skip={self.num_loss_tokens_to_skip} must be >= 0.")
        if self.num_loss_tokens_to_skip >= self.max_completion_length:
            raise ValueError(f"num_loss_tokens_to_skip={self.num_loss_tokens_to_skip} leaves nothing of completions "
                             f"of at most max_completion_length={self.max_completion_length} tokens to train on.")
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate={self.teacher_update_rate} must be in [0, 1].")
        if self.teacher_sync_steps < 1:
            raise ValueError(f"teacher_sync_steps={self.teacher_sync_steps} must be >= 1.")
        if "{prompt}" not in self.teacher_prompt_template or "{privileged_context}" not in \
                self.teacher_prompt_template:
            raise ValueError(f"teacher_prompt_template={self.teacher_prompt_template!r} must contain both {{prompt}} "
                             "and {privileged_context}.")
        if self.num_generations < 1 or self.max_completion_length < 1 or self.num_iterations < 1:
            raise ValueError("num_generations, max_completion_length and num_iterations must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Loss (pure functions on arrays)
# --------------------------------------------------------------------------------------------------------------


# Copied from jaxpt.experimental.sdpo._with_tail_bucket
def _with_tail_bucket(logps: jax.Array) -> jax.Array:
    """Top-k log-probs `[..., k]` (summing to the captured mass P <= 1) and one more entry, log(1 - P)."""
    captured = jnp.minimum(jax.nn.logsumexp(logps, axis=-1, keepdims=True), -1e-7)
    return jnp.concatenate([logps, jnp.log(-jnp.expm1(captured))], axis=-1)


# Copied from jaxpt.experimental.sdpo.self_distillation_divergence
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


# Copied from jaxpt.experimental.sdpo._project
def _project(hidden_chunk, weight, logit_softcap, temperature):
    """float32 logits `[chunk, vocab]` of one chunk, softcapped (Gemma 2), divided by the temperature."""
    logits = jax.lax.dot_general(hidden_chunk, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits / temperature


# Copied from jaxpt.experimental.sdpo.self_distillation_from_hidden
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


# Copied from jaxpt.experimental.sdpo.importance_clipped
def importance_clipped(per_token_loss: jax.Array, logps: jax.Array, old_logps: jax.Array,
                       clip: float) -> jax.Array:
    """`per_token_loss * min(exp(clip_[-20, 20](log p - log p_old)), clip)`, the ratio a constant (TRL's
    `apply_importance_sampling_clipping`)."""
    log_ratio = jnp.clip(jax.lax.stop_gradient(logps - old_logps), -20.0, 20.0)
    return per_token_loss * jnp.minimum(jnp.exp(log_ratio), clip)


def sdft_loss(
    distillation_per_token: jax.Array,
    logps: jax.Array,
    old_logps: jax.Array | None,
    loss_mask: jax.Array,
    *,
    distillation_is_clip: float | None = 2.0,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """SDFT's loss from per-token arrays `[batch, seq]`: `distillation_per_token` (`self_distillation_divergence`),
    the policy's `logps` of the sampled tokens, `old_logps` (None: on-policy, no importance weight, as TRL) and the
    `loss_mask` (the completion tokens after the first `num_loss_tokens_to_skip`):

        L = (1/B) sum_i [sum_t m_it rho_it d_it / max(sum_t m_it, 1)],
        rho = min(exp(log p - log p_old), distillation_is_clip)   (a constant)

    Shenfeld et al. 2026, arXiv:2601.19897. `num_sequences`: the whole accumulated batch's rows (default: this
    batch's), so micro-batch losses add up to the big batch's. Metrics (TRL's names):
    `self_distillation/distillation_loss` and `sdft/distillation_loss`, the token mean of rho d over the mask;
    `(sum, count)` pairs with `return_counts`."""
    loss_mask = loss_mask.astype(jnp.float32)
    num_sequences = jnp.asarray(loss_mask.shape[0] if num_sequences is None else num_sequences, jnp.float32)
    per_token = distillation_per_token
    if distillation_is_clip is not None and old_logps is not None:
        per_token = importance_clipped(per_token, logps, old_logps, distillation_is_clip)
    per_sequence = jnp.sum(per_token * loss_mask, axis=-1) / jnp.maximum(jnp.sum(loss_mask, axis=-1), 1.0)
    loss = jnp.sum(per_sequence) / num_sequences
    pair = sum_and_count(jax.lax.stop_gradient(per_token), loss_mask)
    metrics = {"self_distillation/distillation_loss": pair, "sdft/distillation_loss": pair}
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def privileged_text(privileged_context: Any, *, index: int) -> str:
    """The privileged context as text (TRL's): a string as is, messages' contents joined by newlines."""
    if privileged_context is None:
        raise ValueError(f"Example {index}: privileged_context is None; SDFT's teacher prompt needs it (a "
                         "demonstration or other context the student does not see).")
    if isinstance(privileged_context, str):
        return privileged_context
    if isinstance(privileged_context, list) and privileged_context and isinstance(privileged_context[0], dict):
        chunks = []
        for message in privileged_context:
            content = message.get("content", "")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
            if str(content):
                chunks.append(str(content))
        return "\n".join(chunks)
    return str(privileged_context)


def teacher_prompt(prompt: Any, privileged_context: Any, config: SDFTConfig, *, index: int = 0) -> Any:
    """The teacher's prompt (TRL's `DemonstrationTeacherContextBuilder`): `teacher_prompt_template` filled with the
    prompt and the privileged context; for conversational prompts in place of the last user message's text."""
    context = privileged_text(privileged_context, index=index)
    if isinstance(prompt, str):
        return config.teacher_prompt_template.format(prompt=prompt, privileged_context=context)
    last = prompt[-1]
    if last.get("role") != "user":
        raise ValueError(f"Example {index}: SDFT rewrites the last user message of a conversational prompt for the "
                         f"teacher, but this prompt ends with a {last.get('role')!r} message: end it with a user turn.")
    content = last.get("content", "")
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    text = config.teacher_prompt_template.format(prompt=content, privileged_context=context)
    return list(prompt[:-1]) + [{"role": "user", "content": text}]


def prepare_dataset(dataset, tokenizer, config: SDFTConfig) -> list[dict]:
    """Examples `{"prompt", "prompt_ids", "teacher_prompt", "teacher_prompt_ids"}` from rows with a `prompt`
    (standard or conversational) and a `privileged_context`; both prompts tokenized as TRL does (chat template with the
    generation prompt for conversational data) and cut to their last `max_prompt_length` tokens."""
    if "privileged_context" not in data.column_names(dataset):
        raise ValueError(f"SDFT needs a `privileged_context` column (the demonstration the teacher sees); the dataset "
                         f"has {data.column_names(dataset)}.")
    prompts = data.prepare_prompts(dataset, tokenizer, method="SDFT", max_prompt_length=config.max_prompt_length)
    examples = []
    for index, record in enumerate(prompts):
        teacher = teacher_prompt(record["prompt"], record["columns"]["privileged_context"], config, index=index)
        ids = data.tokenize(tokenizer, teacher, add_generation_prompt=not isinstance(teacher, str))["input_ids"]
        data.check_nonempty(ids, what="teacher prompt", index=index)
        if config.max_prompt_length is not None:
            ids = ids[-config.max_prompt_length:]
        examples.append({"prompt": record["prompt"], "prompt_ids": record["prompt_ids"], "teacher_prompt": teacher,
                         "teacher_prompt_ids": ids})
    return examples


def loss_mask(attention_mask: np.ndarray, num_loss_tokens_to_skip: int) -> np.ndarray:
    """The completion tokens trained on: all generated ones but the first `num_loss_tokens_to_skip` (TRL: they
    carry the teacher prompt's artifacts)."""
    mask = np.asarray(attention_mask, np.int32).copy()
    mask[:, :num_loss_tokens_to_skip] = 0
    return mask


def rollout(state: TrainState, examples: Sequence[dict], tokenizer, config: SDFTConfig, *, key: jax.Array, mesh,
            prompt_buckets: Sequence[int], policy_logps_fn=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sample `num_generations` completions per example after its prompt (the teacher's with
    `generate_from_teacher`) with the policy. Returns the batch's numpy arrays `[n, ...]` (module docstring) and
    TRL's `completions/*` metrics. `policy_logps_fn` (`rollout.make_logps_fn`): given, the arrays get `old_logps`."""
    group = config.num_generations
    pad_id = data.pad_token_id(tokenizer)

    def padded(key_name, rows):
        length = data.bucket_length(max(len(e[key_name]) for e in rows), prompt_buckets)
        return (data.pad_rows([e[key_name] for e in rows], length, pad_id, left=True),
                data.pad_rows([[1] * len(e[key_name]) for e in rows], length, 0, left=True))

    sampled_ids, sampled_mask = padded("teacher_prompt_ids" if config.generate_from_teacher else "prompt_ids",
                                       examples)
    out = generate(state.graphdef, state.full_params(), sampled_ids, sampled_mask, key=key,  # LoRA: adapters on
                   max_new_tokens=config.max_completion_length, temperature=config.temperature,
                   top_k=config.top_k or None, top_p=config.top_p if config.top_p < 1.0 else None,
                   min_p=config.min_p, eos_token_ids=eos_token_ids(tokenizer), pad_token_id=pad_id,
                   num_return_sequences=group, mesh=mesh)
    completion_ids, attention_mask, lengths, finished = (host_array(a) for a in (
        out.completion_ids, out.completion_mask, out.lengths, out.finished))
    attention_mask = np.asarray(attention_mask, np.int32)
    prompt_ids, prompt_mask = padded("prompt_ids", examples)
    teacher_ids, teacher_mask = padded("teacher_prompt_ids", examples)
    arrays = {"prompt_ids": np.repeat(prompt_ids, group, axis=0), "prompt_mask": np.repeat(prompt_mask, group, axis=0),
              "teacher_prompt_ids": np.repeat(teacher_ids, group, axis=0),
              "teacher_prompt_mask": np.repeat(teacher_mask, group, axis=0),
              "completion_ids": np.asarray(completion_ids), "attention_mask": attention_mask,
              "completion_mask": loss_mask(attention_mask, config.num_loss_tokens_to_skip)}
    if policy_logps_fn is not None:
        arrays["old_logps"] = policy_logps_fn(state.full_params(), arrays)
    return arrays, completion_metrics(lengths, finished)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


# Copied from jaxpt.experimental.sdpo._completion_hidden
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
            config: SDFTConfig, num_sequences: jax.Array):
    """Loss of one micro-batch, normalised by the whole step's rows, and its metrics as `(sum, count)` pairs.
    `teacher_params` None: the live policy (`params`, no gradient) is the teacher."""
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(params if teacher_params is None else teacher_params))
    student_hidden = _completion_hidden(student, batch["prompt_ids"], batch["prompt_mask"], batch)
    teacher_hidden = jax.lax.stop_gradient(
        _completion_hidden(teacher, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], batch))
    topk = None if config.distillation_mode != "topk_logits" else min(config.distillation_topk,
                                                                      student.lm_head_weight().shape[0])
    per_token, logps = self_distillation_from_hidden(
        student_hidden, student.lm_head_weight(), teacher_hidden, teacher.lm_head_weight(), batch["completion_ids"],
        distillation_mode=config.distillation_mode, distillation_alpha=config.distillation_alpha,
        distillation_topk=topk, distillation_add_tail=config.distillation_add_tail, temperature=config.temperature,
        student_logit_softcap=student.final_logit_softcap, teacher_logit_softcap=teacher.final_logit_softcap,
        chunk_size=config.logits_chunk_size)
    return sdft_loss(per_token, logps, batch.get("old_logps"), batch["completion_mask"],
                     distillation_is_clip=config.distillation_is_clip, num_sequences=num_sequences,
                     return_counts=True)


def make_train_step(config: SDFTConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    teacher_sharding: Any = None):
    """`state, metrics = step(state, batch, teacher_params)`: one optimizer step over arrays shaped `[accumulation,
    micro_batch, ...]` (module docstring), micro-batches scanned inside. `teacher_params`: full parameters for the
    policy's graph (`teacher_params(...)`), laid out by `teacher_sharding` on a mesh, or None for the live policy.
    jitted with explicit shardings, the state donated."""
    if mesh is not None and teacher_sharding is None and config.teacher_model_kind != "live":
        raise ValueError("make_train_step(mesh=...) needs teacher_sharding (the teacher parameters' shardings).")

    def step(state: TrainState, batch: dict, teacher_params: nnx.State | None):
        num_sequences = jnp.asarray(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1],
                                    jnp.float32)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, teacher_params, micro_batch,
                                                        config, num_sequences, micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(teacher_sharding,))


def make_eval_step(config: SDFTConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                   teacher_sharding: Any = None):
    """`metrics = eval_step(state, batch, teacher_params)`: the loss and the distillation metrics as `(sum, count)`
    pairs (the loss pair weighs the batch by its rows, so batches add up), without updating."""

    def eval_step(state: TrainState, batch: dict, teacher_params: nnx.State | None):
        rows = jnp.asarray(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1], jnp.float32)

        def micro_step(_, micro_batch):
            return None, loss_fn(state.full_params(), state.graphdef, teacher_params, micro_batch, config, rows)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(metric_pairs)
        metrics["loss"] = (jnp.sum(losses) * rows, rows)
        return metrics

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(teacher_sharding,))


# --------------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------------


# Copied from jaxpt.experimental.sdpo.initial_teacher
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


# Copied from jaxpt.experimental.sdpo.teacher_params
def teacher_params(state: TrainState, kept, kind: str):
    """The teacher's full parameters for the step (None: the live policy)."""
    if kind == "ema" and state.frozen is not None:
        return state.full_params(kept)  # EMA adapters on the frozen base
    return kept


# Copied from jaxpt.experimental.sdpo.update_teacher
def update_teacher(kept, state: TrainState, config, *, step: int):
    """After optimizer step `step` (1-based): the EMA moved toward the policy every `teacher_sync_steps` steps,
    `teacher <- teacher_update_rate * policy + (1 - teacher_update_rate) * teacher` (TRL's teacher callbacks)."""
    if config.teacher_model_kind != "ema" or step % config.teacher_sync_steps:
        return kept
    return mix_reference(kept, state.params, config.teacher_update_rate)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: SDFTConfig, *, eval_dataset=None) -> loop.TrainResult:
    """SDFT on `dataset`'s rows (`prompt`, standard or conversational, and `privileged_context`): progress bar,
    `metrics.jsonl` with TRL's names, evaluation (the loss on completions sampled for `eval_dataset`'s prompts),
    orbax checkpoints at rollout boundaries, resume, HF export."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    mesh = mesh_from_config(config)
    micro_batch, steps_per_generation, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    steps_per_rollout = config.num_iterations * steps_per_generation // accumulation
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
    if eval_examples and (config.per_device_eval_batch_size * batch_divisor(mesh)) % config.num_generations:
        raise ValueError(f"per_device_eval_batch_size={config.per_device_eval_batch_size} x "
                         f"{batch_divisor(mesh)} devices must be a multiple of num_generations={config.num_generations}"
                         " (evaluation samples whole groups).")
    distributed.check_same_data(examples, what="SDFT examples")  # every process builds the same global batches
    rollouts_per_epoch = data.steps_per_epoch(len(examples), prompts_per_rollout, method="SDFT")
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    all_examples = examples + (eval_examples or [])
    longest_prompt = max(max(len(e["prompt_ids"]), len(e["teacher_prompt_ids"])) for e in all_examples)
    prompt_buckets = data.length_buckets(max(longest_prompt, 16), min_length=16)
    data.check_model_fits(model, all_examples, ("prompt_ids", "teacher_prompt_ids"), method="SDFT",
                          length_fields="max_prompt_length + max_completion_length",
                          extra_length=config.max_completion_length,
                          extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    kept = initial_teacher(state, config.teacher_model_kind)
    teacher_sharding = None
    if mesh is not None and kept is not None:
        teacher_sharding = jax.tree.map(lambda leaf: leaf.sharding, teacher_params(state, kept,
                                                                                    config.teacher_model_kind))
    # as TRL: old log-probs only when a rollout feeds several steps and the student sampled it
    logps_fn = None
    if steps_per_rollout > 1 and not config.generate_from_teacher:
        logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                                 micro_batch=micro_batch, mesh=mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="sdft", model=model)
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
        raise ValueError(f"SDFT: resuming at step {start_step} with teacher_model_kind='ema' needs the EMA teacher, "
                         "but the checkpoint does not hold it (written by an older jaxpt). Restart the run, or use "
                         "teacher_model_kind='base' or 'live'.")
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="sdft", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step // steps_per_rollout)
    base_key = jax.random.key(config.seed)
    step = start_step
    try:
        while step < total_steps:
            _, indices = next(order)
            chosen = [examples[i] for i in indices]
            arrays, rollout_metrics = rollout(state, chosen, tokenizer, config,
                                              key=jax.random.fold_in(base_key, step // steps_per_rollout), mesh=mesh,
                                              prompt_buckets=prompt_buckets, policy_logps_fn=logps_fn)
            if config.log_completions:
                _log_completions(config, step, chosen, arrays, tokenizer)
            micro_batches = {k: v.reshape(steps_per_generation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            rollout_tokens = int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            for iteration in range(config.num_iterations):
                for first in range(0, steps_per_generation, accumulation):
                    if step >= total_steps:
                        break
                    batch = {k: v[first:first + accumulation] for k, v in micro_batches.items()}
                    note_shape(batch)
                    placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)
                    state, metrics = train_step(state, placed, teacher_params(state, kept, config.teacher_model_kind))
                    kept = update_teacher(kept, state, config, step=step + 1)
                    if iteration == 0:
                        num_tokens += rollout_tokens * accumulation // steps_per_generation
                    step += 1
                    log.log(step, {**metrics, **rollout_metrics, "learning_rate": schedule(step - 1),
                                   "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate(eval_step, state, teacher_params(state, kept,
                                                                                     config.teacher_model_kind),
                                                    eval_examples, tokenizer, config, mesh=mesh,
                                                    prompt_buckets=prompt_buckets)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens},
                                 extra={"teacher": kept} if ema_teacher else None)
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def evaluate(eval_step, state, teacher, examples: Sequence[dict], tokenizer, config: SDFTConfig, *, mesh,
             prompt_buckets: Sequence[int]) -> dict[str, float]:
    """The loss on completions the policy samples for every eval prompt, over the whole eval set, with an `eval_`
    prefix. Batches of `per_device_eval_batch_size x devices` completions (whole groups), the last one filled up
    with its last prompt (left out of the totals)."""
    rows = config.per_device_eval_batch_size * batch_divisor(mesh)
    per_batch = rows // config.num_generations
    key = jax.random.key(config.seed + 1)
    totals = None
    for index, start in enumerate(range(0, len(examples), per_batch)):
        chunk = list(examples[start:start + per_batch])
        real = len(chunk)
        chunk += [chunk[-1]] * (per_batch - real)
        arrays, _ = rollout(state, chunk, tokenizer, config, key=jax.random.fold_in(key, index), mesh=mesh,
                            prompt_buckets=prompt_buckets)
        filled = np.zeros(rows, bool)
        filled[real * config.num_generations:] = True
        arrays["completion_mask"][filled] = 0  # the fill-up rows count for nothing
        placed = shard_batch({k: v[None] for k, v in arrays.items()}, mesh, batch_axis=1, global_batch=True)
        pairs = jax.device_get(eval_step(state, placed, teacher))
        loss_total, _ = pairs["loss"]  # rows weigh the loss: count the real ones only
        pairs["loss"] = (loss_total, np.float32(real * config.num_generations))
        totals = add_metrics(totals, pairs)
    return {f"eval_{name}": float(value) for name, value in mean_metrics(totals).items()}


def _log_completions(config: SDFTConfig, step: int, examples: Sequence[dict], arrays: dict, tokenizer) -> None:
    lengths = arrays["attention_mask"].sum(axis=1)
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(arrays["completion_ids"], lengths,
                                                                        strict=True)], skip_special_tokens=True)
    repeated = [e for e in examples for _ in range(config.num_generations)]
    append_jsonl(Path(config.output_dir) / "completions.jsonl",
                 [{"step": step, "prompt": e["prompt"], "teacher_prompt": e["teacher_prompt"], "completion": t}
                  for e, t in zip(repeated, texts, strict=True)])
