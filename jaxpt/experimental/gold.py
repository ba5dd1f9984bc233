"""General Online Logit Distillation (GOLD): `GOLDConfig`, the ULD loss and its token alignment, `make_train_step`,
`train`. Experimental: no stability promise (see `jaxpt.experimental`).

GOLD is TRL 1.16's `trl.experimental.gold.GOLDTrainer`: on-policy distillation (the student samples a fraction
`lmbda` of the steps; otherwise the dataset's — or with `seq_kd` the teacher's — completions) from a teacher that may
have another tokenizer. Same tokenizer (`use_uld_loss=False`): `jaxpt.distillation`'s step, the generalized JSD at
`temperature` (TRL's GOLD applies its temperature to the divergence too). Another tokenizer (`use_uld_loss=True`):
Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030), which compares the two distributions
without a shared vocabulary, on spans of the completion text both tokenizations agree on.

ULD, per example (the completion text tokenized by the student, s_1..s_n, and by the teacher, t_1..t_m; the last
token — EOS — left out of each with `uld_skip_student_eos` / `uld_skip_teacher_eos`):

1. Alignment (`use_extended_uld=True`): walk both tokenizations' UTF-8 byte spans; a group closes where both end
   at the same byte. Group g pairs student tokens S_g with teacher tokens T_g (`align_by_byte_offsets`).
   `use_extended_uld=False`: the first min(n, m) positions pair one to one (the ULD paper's truncation).
2. Distributions: p_k = softmax(z_k / T) with `uld_student_temperature` / `uld_teacher_temperature`, where z_k is
   the logit row at token k's position (`uld_token_merge_strategy="observed"`, as the ULD paper) or at the position
   before (`"bayesian"`: the row that predicts token k).
3. Merge a group of tokens k_1 < ... < k_r into one unnormalised distribution:
       observed:  q_g = p_{k_1} * prod_{j>1} max(p_{k_j}[x_{k_j}], 1e-8)
       bayesian:  q_g = p_{k_r} * prod_{j<r} max(p_{k_j}[x_{k_j}], 1e-8)        (x_k: the token at k)
4. Distance of a group: d_g = sum_i |sort_desc(q^s_g)_i - sort_desc(q^t_g)_i| (the shorter vocabulary padded
   with zeros). Hybrid (`uld_use_hybrid_loss`): tokens spelled the same in both vocabularies are compared
   directly, d_g = w_m JSD_beta(q^s_g[matched], q^t_g[matched]) + w_u L1(sorted unmatched columns), with the JSD on
   log max(q, 1e-8) summed over the matched columns and (w_m, w_u) = (`uld_hybrid_matched_weight`,
   `uld_hybrid_unmatched_weight`) or, unset, (matched / teacher vocabulary, 1 - that).
5. Loss: L = uld_distillation_weight * mean_examples( mean_g d_g ) + uld_crossentropy_weight * CE, where an
   example without aligned groups counts 0 and CE is the student's next-token cross-entropy on its completion tokens.

Deltas from TRL, each deliberate: token byte spans come from decoding prefixes of the token ids (any tokenizer, not
only ByteLevel BPE); the completion text the teacher tokenizes is the student's completion decoded without special
tokens; the teacher sees the student's rendered prompt text (as TRL); `matched_loss`/`unmatched_loss` are the batch
means (TRL logs its last example's); the on/off-policy choice is drawn per optimizer step from the seed (exact resume);
with gradient accumulation the step averages over all its examples. Not implemented: `num_generations`,
`generation_batch_size`, vLLM, vision-language models.

Evaluation (`eval_dataset`, `eval_strategy`/`eval_steps`), as TRL's GOLD `prediction_step`: off-policy, no sampling,
the training loss on the eval dataset's own prompts and completions (prompt-completion or `messages` data), logged
as `eval_loss`. Over the whole eval set it is the loss one step over all of it would have (ULD: the distance summed
over the examples / their number, plus the cross-entropy summed over the tokens / their number; same tokenizer: the
JSD summed over the tokens / their number); TRL averages per-batch losses, equal when the batches are alike. Batches
of `per_device_eval_batch_size x devices` examples, the last filled up with its last example (the copies count 0).

Memory: the ULD path builds the completions' full logits `[batch, completion, vocab]` of both models (it sorts whole
distributions, and a sort over the vocabulary cannot be split into chunks of it), so unlike `jaxpt.distillation` it
does not chunk over the vocabulary: its activation memory grows with batch x completion length x vocabulary. On a
mesh those logits are split over the batch (data / fsdp) like every activation (the sharded step equals the
unsharded one, tests/experimental/test_gold.py).

```python
config = GOLDConfig(output_dir="out", use_uld_loss=True, max_completion_length=64, max_steps=100)
result = jaxpt.experimental.gold.train(student, tokenizer, dataset, config, teacher_model=teacher,
                                        teacher_tokenizer=teacher_tokenizer)
```
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpt import data, distillation, distributed, loop, lora
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.losses.logprobs import token_logps
from jaxpt.losses.metrics import add_metrics, mean_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rollout import completion_metrics, eos_token_ids
from jaxpt.sampling import generate
from jaxpt.sharding import batch_divisor, host_array, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

MERGE_STRATEGIES = ("observed", "bayesian")
PROBABILITY_FLOOR = 1e-8  # TRL's clamp of the scalar token probabilities and of the hybrid JSD's inputs


@dataclass
class GOLDConfig(TrainingConfig):
    """TRL 1.16's `GOLDConfig` fields that have a meaning here (same names and defaults), plus jaxpt's
    `max_prompt_length`, `shuffle_dataset`, `log_completions` and `logits_chunk_size` (as `DistillationConfig`)."""

    learning_rate: float = field(default=1e-7, metadata={"help": "Peak learning rate (TRL's GOLD default)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature; also the temperature of the "
                                                              "generalized JSD (use_uld_loss=False)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    lmbda: float = field(default=0.5, metadata={"help": "Fraction of steps trained on completions the student "
                                                        "samples (on-policy)."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD interpolation: 0.0 forward KL(teacher || "
                                                       "student), 0.5 JSD, 1.0 reverse KL (also the hybrid ULD's "
                                                       "matched part)."})
    max_completion_length: int = field(default=128, metadata={"help": "Tokens generated per completion at most "
                                                                      "(dataset completions are cut to it too)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher: Hugging Face checkpoint directory or Hub id (the command line loads it; `train` takes "
                "the loaded model)."})
    teacher_tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher's tokenizer for use_uld_loss (default: the teacher model's directory)."})
    seq_kd: bool = field(default=False, metadata={"help": "Sequence-level KD: the steps that are not on-policy "
                                                          "train on completions the teacher samples (same tokenizer "
                                                          "only)."})
    use_uld_loss: bool = field(default=False, metadata={"help": "Universal Logit Distillation (a teacher with "
                                                                "another tokenizer) instead of the generalized JSD."})
    use_extended_uld: bool = field(default=True, metadata={"help": "Align the two tokenizations by their byte spans "
                                                                   "and merge split tokens; False: positional "
                                                                   "truncation (the ULD paper)."})
    uld_token_merge_strategy: str = field(default="observed", metadata={
        "help": "'observed': logits at each answer token's position, a group merges from its first token; "
                "'bayesian': the logits that predict each token, a group merges from its last token."})
    uld_use_hybrid_loss: bool = field(default=False, metadata={"help": "JSD on the tokens both vocabularies share, "
                                                                       "sorted L1 on the others."})
    uld_hybrid_matched_weight: float | None = field(default=None, metadata={
        "help": "Weight of the matched (JSD) part of the hybrid loss (None with the unmatched weight: the shared "
                "fraction of the teacher's vocabulary)."})
    uld_hybrid_unmatched_weight: float | None = field(default=None, metadata={
        "help": "Weight of the unmatched (sorted L1) part of the hybrid loss (None together with the matched "
                "weight)."})
    uld_crossentropy_weight: float = field(default=0.0, metadata={"help": "Weight of the student's cross-entropy on "
                                                                          "the completion tokens."})
    uld_distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the ULD distance."})
    uld_student_temperature: float = field(default=1.0, metadata={"help": "Temperature of the student's ULD "
                                                                          "distributions."})
    uld_teacher_temperature: float = field(default=1.0, metadata={"help": "Temperature of the teacher's ULD "
                                                                          "distributions."})
    uld_skip_student_eos: bool = field(default=True, metadata={"help": "Leave the student's last completion token "
                                                                       "(EOS) out of the ULD loss."})
    uld_skip_teacher_eos: bool = field(default=True, metadata={"help": "Leave the teacher's last completion token "
                                                                       "(EOS) out of the ULD loss."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last this many prompt tokens "
                                                                          "(jaxpt; None: no truncation)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts and completions "
                                                                   "to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the generalized JSD "
                                                                   "(use_uld_loss=False)."})

    def validate(self) -> None:
        super().validate()
        distillation_config(self)  # the stable method's checks of the shared fields (beta, lmbda, top_p, ...)
        for name in ("uld_crossentropy_weight", "uld_distillation_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("uld_student_temperature", "uld_teacher_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        if self.uld_token_merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(f"uld_token_merge_strategy={self.uld_token_merge_strategy!r}; use one of "
                             f"{MERGE_STRATEGIES}.")
        weights = (self.uld_hybrid_matched_weight, self.uld_hybrid_unmatched_weight)
        if (weights[0] is None) != (weights[1] is None):
            raise ValueError(f"uld_hybrid_matched_weight={weights[0]} and uld_hybrid_unmatched_weight={weights[1]}: "
                             "set both (fixed weights) or neither (weights from the shared vocabulary).")
        if weights[0] is not None and min(weights) < 0:
            raise ValueError(f"uld_hybrid_matched_weight={weights[0]} and uld_hybrid_unmatched_weight={weights[1]} "
                             "must be >= 0.")
        if self.use_uld_loss and self.seq_kd:
            raise ValueError("seq_kd=True with use_uld_loss=True: the teacher's samples would be in the teacher's "
                             "tokenization, which the student cannot train on; set one of them to false.")


def distillation_config(config: GOLDConfig) -> distillation.DistillationConfig:
    """The `jaxpt.distillation` configuration of GOLD's data, sampling and same-tokenizer step."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingConfig)}
    return distillation.DistillationConfig(
        **shared, teacher_model_name_or_path=config.teacher_model_name_or_path,
        max_completion_length=config.max_completion_length, max_prompt_length=config.max_prompt_length,
        shuffle_dataset=config.shuffle_dataset, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, min_p=None, beta=config.beta, lmbda=config.lmbda, log_completions=config.log_completions,
        logits_chunk_size=config.logits_chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Alignment (host side: it depends on the token texts)
# --------------------------------------------------------------------------------------------------------------


def align_by_byte_offsets(student_spans: Sequence[Sequence[int]], teacher_spans: Sequence[Sequence[int]]
                          ) -> tuple[list[list[int]], list[list[int]]]:
    """Group two tokenizations of one text where their token boundaries agree. `*_spans` are `(start, end)` UTF-8
    byte spans per token; the side whose current token ends first advances, and a group closes when both end at the
    same byte. Whatever is left when one side runs out forms a last group. Returns the token indices per group."""
    student_groups: list[list[int]] = []
    teacher_groups: list[list[int]] = []
    s = t = 0
    s_open: list[int] = []
    t_open: list[int] = []
    while s < len(student_spans) and t < len(teacher_spans):
        s_end, t_end = student_spans[s][1], teacher_spans[t][1]
        if s_end <= t_end:
            s_open.append(s)
            s += 1
        if t_end <= s_end:
            t_open.append(t)
            t += 1
        if s_end == t_end:
            student_groups.append(s_open)
            teacher_groups.append(t_open)
            s_open, t_open = [], []
    if s < len(student_spans) or t < len(teacher_spans):
        student_groups.append(s_open + list(range(s, len(student_spans))))
        teacher_groups.append(t_open + list(range(t, len(teacher_spans))))
    return student_groups, teacher_groups


def answer_groups(student_spans: Sequence[Sequence[int]], teacher_spans: Sequence[Sequence[int]], *,
                  use_extended_uld: bool) -> tuple[list[list[int]], list[list[int]]]:
    """The paired token groups of one example's answer (EOS already left out): byte alignment without the pairs
    where one side is empty, or (positional ULD) the first min(n, m) tokens one to one."""
    if not use_extended_uld:
        shared = min(len(student_spans), len(teacher_spans))
        return [[k] for k in range(shared)], [[k] for k in range(shared)]
    if not student_spans or not teacher_spans:
        return [], []
    pairs = [(s, t) for s, t in zip(*align_by_byte_offsets(student_spans, teacher_spans), strict=True) if s and t]
    return [s for s, _ in pairs], [t for _, t in pairs]


def alignment_arrays(student_groups: Sequence[Sequence[Sequence[int]]],
                     teacher_groups: Sequence[Sequence[Sequence[int]]], *, merge_strategy: str, student_length: int,
                     teacher_length: int, num_groups: int) -> dict[str, np.ndarray]:
    """The groups of a batch as the arrays `uld_loss` takes: per side `*_base_index` `[batch, num_groups]` (the
    token whose whole distribution a group keeps: its first, observed, or last, bayesian), `*_scalar_group`
    `[batch, length]` (the group whose product a token's probability joins, -1 for none), and `group_mask`
    `[batch, num_groups]`."""
    batch = len(student_groups)
    arrays = {"group_mask": np.zeros((batch, num_groups), np.int32)}
    for side, groups, length in (("student", student_groups, student_length),
                                 ("teacher", teacher_groups, teacher_length)):
        base = np.zeros((batch, num_groups), np.int32)
        scalar = np.full((batch, length), -1, np.int32)
        for row, example_groups in enumerate(groups):
            if len(example_groups) > num_groups:
                raise ValueError(f"{len(example_groups)} aligned groups do not fit num_groups={num_groups}.")
            for g, tokens in enumerate(example_groups):
                keep = tokens[-1] if merge_strategy == "bayesian" else tokens[0]
                base[row, g] = keep
                scalar[row, [k for k in tokens if k != keep]] = g
                arrays["group_mask"][row, g] = 1
        arrays[f"{side}_base_index"], arrays[f"{side}_scalar_group"] = base, scalar
    return arrays


def token_byte_spans(tokenizer, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """UTF-8 byte span of each token in `tokenizer.decode(token_ids, skip_special_tokens=True)`, from the decoded
    lengths of growing prefixes (special tokens are empty spans at the end of what precedes them)."""
    spans, previous = [], 0
    for k in range(len(token_ids)):
        end = len(tokenizer.decode(list(token_ids[:k + 1]), skip_special_tokens=True).encode("utf-8"))
        end = max(end, previous)  # a prefix that decodes shorter (a split multi-byte character) adds nothing yet
        spans.append((previous, end))
        previous = end
    return spans


# --------------------------------------------------------------------------------------------------------------
# Loss (pure)
# --------------------------------------------------------------------------------------------------------------


class HybridVocabulary(NamedTuple):
    """Token ids spelled the same in both vocabularies (paired, ordered by the teacher's id) and the rest, per
    side; `matched_fraction` = matched / teacher vocabulary (the adaptive matched weight)."""

    student_matched: np.ndarray
    teacher_matched: np.ndarray
    student_unmatched: np.ndarray
    teacher_unmatched: np.ndarray
    matched_fraction: float


def hybrid_vocabulary(student_tokenizer, teacher_tokenizer, *, student_vocab_size: int,
                      teacher_vocab_size: int) -> HybridVocabulary:
    """The shared tokens of two tokenizers (`get_vocab()` strings) within the models' vocabulary sizes."""
    student_vocab = student_tokenizer.get_vocab()
    pairs = sorted((teacher_id, student_vocab[token]) for token, teacher_id in teacher_tokenizer.get_vocab().items()
                   if token in student_vocab and teacher_id < teacher_vocab_size
                   and student_vocab[token] < student_vocab_size)
    teacher_matched = np.asarray([t for t, _ in pairs], np.int32)
    student_matched = np.asarray([s for _, s in pairs], np.int32)
    return HybridVocabulary(
        student_matched, teacher_matched,
        np.setdiff1d(np.arange(student_vocab_size), student_matched).astype(np.int32),
        np.setdiff1d(np.arange(teacher_vocab_size), teacher_matched).astype(np.int32),
        len(pairs) / max(1, teacher_vocab_size))


def merge_group_probs(probs: jax.Array, token_ids: jax.Array, base_index: jax.Array,
                      scalar_group: jax.Array) -> jax.Array:
    """q_g = p_{base(g)} * prod_{k in group g, k != base} max(p_k[x_k], 1e-8): `probs` `[batch, length, vocab]`,
    `token_ids` `[batch, length]`, `base_index` `[batch, groups]`, `scalar_group` `[batch, length]` ->
    `[batch, groups, vocab]`."""
    num_groups = base_index.shape[-1]
    token_probs = jnp.take_along_axis(probs, token_ids[..., None], axis=-1)[..., 0]  # [batch, length]
    log_scalar = jnp.log(jnp.maximum(token_probs, PROBABILITY_FLOOR))
    membership = (scalar_group[..., None] == jnp.arange(num_groups)).astype(probs.dtype)  # [batch, length, groups]
    group_scale = jnp.exp(jnp.einsum("bk,bkg->bg", log_scalar, membership))
    base = jnp.take_along_axis(probs, base_index[..., None], axis=1)  # [batch, groups, vocab]
    return base * group_scale[..., None]


def sorted_l1(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """sum_i |sort_desc(student)_i - sort_desc(teacher)_i| over the last axis, the narrower one padded with zeros."""
    width = max(student.shape[-1], teacher.shape[-1])

    def descending(x):
        x = -jnp.sort(-x, axis=-1)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    return jnp.sum(jnp.abs(descending(student) - descending(teacher)), axis=-1)


def probability_jsd(student: jax.Array, teacher: jax.Array, *, beta: float) -> jax.Array:
    """Generalized JSD of (unnormalised) probabilities, summed over the last axis, on log max(p, 1e-8) as TRL's
    `generalized_jsd_loss(logits_are_probs=True)`: beta 0 KL(t || s), beta 1 KL(s || t)."""
    log_s = jnp.log(jnp.maximum(student, PROBABILITY_FLOOR))
    log_t = jnp.log(jnp.maximum(teacher, PROBABILITY_FLOOR))
    if beta == 0.0:
        terms = jnp.exp(log_t) * (log_t - log_s)
    elif beta == 1.0:
        terms = jnp.exp(log_s) * (log_s - log_t)
    else:
        log_m = jnp.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        terms = beta * jnp.exp(log_t) * (log_t - log_m) + (1.0 - beta) * jnp.exp(log_s) * (log_s - log_m)
    return jnp.sum(terms, axis=-1)


def uld_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_token_ids: jax.Array,
    teacher_token_ids: jax.Array,
    alignment: dict[str, jax.Array],
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    distillation_weight: float = 1.0,
    hybrid: HybridVocabulary | None = None,
    hybrid_matched_weight: float | None = None,
    hybrid_unmatched_weight: float | None = None,
    beta: float = 0.5,
    num_examples: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ULD distance (module docstring, steps 2-5 without the cross-entropy). Logit rows `[batch, length_s,
    vocab_s]` / `[batch, length_t, vocab_t]` — row k the one used for answer token k (observed or bayesian) —, the
    answer tokens `[batch, length_*]`, and `alignment_arrays`' arrays. The mean over examples divides by
    `num_examples` (default: the batch; the step passes its total so micro-batches add up). The teacher is constant.
    Metrics: `matched_loss`, `unmatched_loss` (hybrid only), batch means."""
    student_probs = jax.nn.softmax(student_logits.astype(jnp.float32) / student_temperature, axis=-1)
    teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / teacher_temperature,
                                   axis=-1)
    student_q = merge_group_probs(student_probs, student_token_ids, alignment["student_base_index"],
                                  alignment["student_scalar_group"])
    teacher_q = merge_group_probs(teacher_probs, teacher_token_ids, alignment["teacher_base_index"],
                                  alignment["teacher_scalar_group"])
    group_mask = alignment["group_mask"].astype(jnp.float32)
    groups = jnp.maximum(jnp.sum(group_mask, axis=-1), 1.0)
    denominator = student_logits.shape[0] if num_examples is None else num_examples

    def example_mean(rows):  # [batch, groups] -> the sum over examples of each one's mean over its groups
        return jnp.sum(jnp.sum(rows * group_mask, axis=-1) / groups)

    metrics = {}
    if hybrid is None:
        distance = sorted_l1(student_q, teacher_q)
    else:
        matched = jnp.zeros(group_mask.shape)
        if hybrid.teacher_matched.size:
            matched = probability_jsd(student_q[..., hybrid.student_matched], teacher_q[..., hybrid.teacher_matched],
                                      beta=beta)
        unmatched = jnp.zeros(group_mask.shape)
        if hybrid.student_unmatched.size and hybrid.teacher_unmatched.size:
            unmatched = sorted_l1(student_q[..., hybrid.student_unmatched], teacher_q[..., hybrid.teacher_unmatched])
        if hybrid_matched_weight is None:
            hybrid_matched_weight, hybrid_unmatched_weight = hybrid.matched_fraction, 1.0 - hybrid.matched_fraction
        distance = hybrid_matched_weight * matched + hybrid_unmatched_weight * unmatched
        metrics = {"matched_loss": jax.lax.stop_gradient(example_mean(matched) / denominator),
                   "unmatched_loss": jax.lax.stop_gradient(example_mean(unmatched) / denominator)}
    return distillation_weight * example_mean(distance) / denominator, metrics


# --------------------------------------------------------------------------------------------------------------
# Data (ULD: both tokenizations of each completion)
# --------------------------------------------------------------------------------------------------------------


def teacher_prompt_ids(prompt_ids: Sequence[int], tokenizer, teacher_tokenizer) -> list[int]:
    """The teacher's prompt: the student's rendered prompt text tokenized by the teacher (its special tokens added,
    a trailing EOS dropped so the completion follows), as TRL's GOLD."""
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    ids = list(teacher_tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == teacher_tokenizer.eos_token_id:
        ids = ids[:-1]
    if not ids:
        raise ValueError(f"The prompt {text!r} tokenizes to no teacher tokens: GOLD's teacher needs a prompt to "
                         "continue from; check teacher_tokenizer_name_or_path.")
    return ids


def _round_up(length: int) -> int:
    """A padded length from a fixed ladder (16, 24, 32, 48, 64, ...): few compiled shapes, little waste."""
    return data.bucket_length(length, data.length_buckets(2 ** math.ceil(math.log2(max(length, 16))), min_length=16))


def uld_batch(arrays: dict[str, np.ndarray], teacher_prompts: Sequence[Sequence[int]], tokenizer, teacher_tokenizer,
              config: GOLDConfig) -> dict[str, np.ndarray]:
    """A student batch (`jaxpt.distillation` layout, prompts left-padded, completions right-padded) plus what ULD
    needs: the teacher's tokens of the same prompts and completion texts (`teacher_prompt_ids`/`_mask` left-padded,
    `teacher_completion_ids`, `teacher_attention_mask` right-padded; the completion is the student's decoded without
    special tokens, then the teacher's EOS) and the alignment arrays of the answers."""
    completion_length = arrays["completion_ids"].shape[1]
    student_groups, teacher_groups, teacher_completions = [], [], []
    for ids, mask in zip(arrays["completion_ids"], arrays["attention_mask"], strict=True):
        student_ids = [int(i) for i in ids[:int(mask.sum())]]
        text = tokenizer.decode(student_ids, skip_special_tokens=True)
        teacher_ids = list(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
        if teacher_tokenizer.eos_token_id is not None:
            teacher_ids.append(teacher_tokenizer.eos_token_id)
        teacher_completions.append(teacher_ids)
        student_answer = student_ids[:len(student_ids) - 1] if config.uld_skip_student_eos else student_ids
        teacher_answer = teacher_ids[:len(teacher_ids) - 1] if config.uld_skip_teacher_eos else teacher_ids
        spans = ((token_byte_spans(tokenizer, student_answer), token_byte_spans(teacher_tokenizer, teacher_answer))
                 if config.use_extended_uld else (student_answer, teacher_answer))
        groups = answer_groups(*spans, use_extended_uld=config.use_extended_uld)
        student_groups.append(groups[0])
        teacher_groups.append(groups[1])
    teacher_length = _round_up(max(map(len, teacher_completions)))
    teacher_prompt_length = _round_up(max(map(len, teacher_prompts)))
    teacher_pad = data.pad_token_id(teacher_tokenizer)
    out = dict(arrays)
    out.update(
        teacher_prompt_ids=data.pad_rows(teacher_prompts, teacher_prompt_length, teacher_pad, left=True),
        teacher_prompt_mask=data.pad_rows([[1] * len(p) for p in teacher_prompts], teacher_prompt_length, 0, left=True),
        teacher_completion_ids=data.pad_rows(teacher_completions, teacher_length, teacher_pad),
        teacher_attention_mask=data.pad_rows([[1] * len(c) for c in teacher_completions], teacher_length, 0),
        **alignment_arrays(student_groups, teacher_groups, merge_strategy=config.uld_token_merge_strategy,
                           student_length=completion_length, teacher_length=teacher_length,
                           num_groups=completion_length))
    return out


# --------------------------------------------------------------------------------------------------------------
# Step (ULD; the same-tokenizer step is jaxpt.distillation's)
# --------------------------------------------------------------------------------------------------------------


def _answer_logits(model: nnx.Module, prompt_ids, prompt_mask, completion_ids, attention_mask, *, shift: int):
    """Logits `[batch, completion, vocab]`: row k at completion token k's position (`shift=0`, observed) or at the
    one before (`shift=1`: the row that predicts token k)."""
    prompt_length, completion_length = prompt_ids.shape[-1], completion_ids.shape[-1]
    logits = model(jnp.concatenate([prompt_ids, completion_ids], axis=-1),
                   attention_mask=jnp.concatenate([prompt_mask, attention_mask], axis=-1))
    return logits[:, prompt_length - shift: prompt_length + completion_length - shift]


def uld_loss_fn(params: nnx.State, graphdef: nnx.GraphDef, teacher_params: nnx.State, teacher_graphdef: nnx.GraphDef,
                batch: dict, config: GOLDConfig, hybrid: HybridVocabulary | None, num_examples: jax.Array,
                num_tokens: jax.Array):
    """GOLD's ULD loss of one micro-batch (with the optional cross-entropy), normalised by the step's examples
    (distance) and completion tokens (cross-entropy), and its metrics as `(sum, count)` pairs."""
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    shift = 1 if config.uld_token_merge_strategy == "bayesian" else 0
    student_rows = _answer_logits(student, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                  batch["attention_mask"], shift=shift)
    teacher_rows = jax.lax.stop_gradient(_answer_logits(
        teacher, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], batch["teacher_completion_ids"],
        batch["teacher_attention_mask"], shift=shift))
    alignment = {k: batch[k] for k in ("student_base_index", "student_scalar_group", "teacher_base_index",
                                       "teacher_scalar_group", "group_mask")}
    loss, metrics = uld_loss(student_rows, teacher_rows, batch["completion_ids"], batch["teacher_completion_ids"],
                             alignment, student_temperature=config.uld_student_temperature,
                             teacher_temperature=config.uld_teacher_temperature,
                             distillation_weight=config.uld_distillation_weight, hybrid=hybrid,
                             hybrid_matched_weight=config.uld_hybrid_matched_weight,
                             hybrid_unmatched_weight=config.uld_hybrid_unmatched_weight, beta=config.beta,
                             num_examples=num_examples)
    # (sum over this micro-batch's examples, their count): summed over micro-batches, the mean over the step
    micro_batch = jnp.asarray(batch["completion_ids"].shape[0], jnp.float32)
    pairs = {name: (value * num_examples, micro_batch) for name, value in metrics.items()}
    if config.uld_crossentropy_weight > 0:
        cross_entropy = _cross_entropy_sum(student, batch, student_rows if shift == 1 else None) / num_tokens
        loss = loss + config.uld_crossentropy_weight * cross_entropy
    return loss, pairs


def _cross_entropy_sum(student: nnx.Module, batch: dict, predicting: jax.Array | None = None) -> jax.Array:
    """The student's next-token cross-entropy summed over the completion tokens (`predicting`: the logit rows that
    predict them, when already computed)."""
    if predicting is None:
        predicting = _answer_logits(student, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                    batch["attention_mask"], shift=1)
    mask = batch["completion_mask"].astype(jnp.float32)
    return -jnp.sum(token_logps(predicting, batch["completion_ids"]) * mask)


def make_uld_train_step(config: GOLDConfig, *, teacher_graphdef: nnx.GraphDef, hybrid: HybridVocabulary | None = None,
                        mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                        teacher_sharding: Any = None):
    """`state, metrics = step(state, batch, teacher_params)`: one optimizer step of GOLD's ULD loss over arrays
    shaped `[accumulation, micro_batch, ...]` (`uld_batch`'s), micro-batches scanned inside. jitted with explicit
    shardings, the state donated."""

    def step(state: TrainState, batch: dict, teacher_params: nnx.State):
        num_examples = jnp.asarray(batch["completion_ids"].shape[0] * batch["completion_ids"].shape[1], jnp.float32)
        num_tokens = jnp.maximum(jnp.sum(batch["completion_mask"].astype(jnp.float32)), 1.0)
        grad_fn = lora.value_and_grad(uld_loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, pairs), micro_grads = grad_fn(state.params, state.graphdef, teacher_params, teacher_graphdef,
                                                 micro_batch, config, hybrid, num_examples, num_tokens,
                                                 micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(batch["completion_ids"].shape[0])
        grads, (losses, pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = {name: jnp.sum(total) / jnp.sum(count) for name, (total, count) in pairs.items()}
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(teacher_sharding,))


def make_uld_eval_step(config: GOLDConfig, *, teacher_graphdef: nnx.GraphDef, hybrid: HybridVocabulary | None = None,
                       mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                       teacher_sharding: Any = None):
    """`metrics = eval_step(state, batch, teacher_params)`: the ULD loss's parts summed over a batch shaped
    `[micro_batches, micro_batch, ...]` without updating, as `(sum, count)` pairs that add up over batches:
    `distance` (`uld_distillation_weight` x the examples' distances; counted on the host) and `cross_entropy`
    (over the completion tokens)."""
    distance_config = dataclasses.replace(config, uld_crossentropy_weight=0.0)

    def eval_step(state: TrainState, batch: dict, teacher_params: nnx.State):
        def micro_step(_, micro_batch):
            params = state.full_params()
            distance, _ = uld_loss_fn(params, state.graphdef, teacher_params, teacher_graphdef, micro_batch,
                                      distance_config, hybrid, jnp.float32(1.0), jnp.float32(1.0))
            cross_entropy = jnp.float32(0.0)
            if config.uld_crossentropy_weight > 0:
                cross_entropy = _cross_entropy_sum(nnx.merge(state.graphdef, params), micro_batch)
            return None, (distance, cross_entropy)

        _, (distances, cross_entropies) = jax.lax.scan(micro_step, None, batch)
        tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
        return {"distance": (jnp.sum(distances), jnp.float32(0.0)), "cross_entropy": (jnp.sum(cross_entropies), tokens)}

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(teacher_sharding,))


def evaluate(eval_step, state: TrainState, teacher_params: nnx.State, examples: Sequence[dict], tokenizer,
             teacher_tokenizer, config: GOLDConfig, *, mesh, prompt_buckets: Sequence[int],
             completion_buckets: Sequence[int]) -> dict[str, float]:
    """`eval_loss`: the training loss on the eval examples' own completions (off-policy, as TRL's GOLD evaluates),
    over the whole eval set (module docstring), in batches of `per_device_eval_batch_size x devices` examples, the
    last filled up with its last example (counted 0). `eval_step`: `make_uld_eval_step`'s, or with the same
    tokenizer `jaxpt.distillation.make_eval_step`'s."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    totals = None
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        arrays, _ = distillation.dataset_completions(chunk, tokenizer, prompt_buckets=prompt_buckets,
                                                     completion_buckets=completion_buckets)
        if config.use_uld_loss:
            arrays = uld_batch(arrays, [e["teacher_prompt_ids"] for e in chunk], tokenizer, teacher_tokenizer, config)
            arrays["group_mask"][real:] = 0  # the fill-up rows' distances count 0
        arrays["completion_mask"][real:] = 0
        batch = {k: v[None] for k, v in arrays.items()}
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True)
        totals = add_metrics(totals, jax.device_get(eval_step(state, placed, teacher_params)))
    if not config.use_uld_loss:
        return {"eval_loss": float(mean_metrics(totals)["loss"])}
    distance = float(totals["distance"][0]) / len(examples)
    cross_entropy, tokens = (float(x) for x in totals["cross_entropy"])
    return {"eval_loss": distance + config.uld_crossentropy_weight * cross_entropy / max(tokens, 1.0)}


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: GOLDConfig, *, teacher_model: nnx.Module,
          teacher_tokenizer=None, eval_dataset=None) -> loop.TrainResult:
    """Distil `teacher_model` into `model` with GOLD on `dataset` (TRL prompt-only — with `lmbda=1` or `seq_kd` —,
    prompt-completion or `messages` data). `use_uld_loss=True` takes the teacher's tokenizer (`teacher_tokenizer`,
    default the student's). `metrics.jsonl` has `loss`, `on_policy_loss` / `off_policy_loss` (each averaged over
    the steps of its kind), `matched_loss` / `unmatched_loss` (hybrid ULD), `completions/*`; evaluation (`eval_loss`
    on `eval_dataset`'s own completions, prompt-completion or `messages` data); checkpoints, exact resume and HF
    export of the student."""
    config.validate()
    loop.prepare_output_dir(config)
    sampling_config = distillation_config(config)
    data_config = sampling_config.replace(lmbda=1.0) if config.seq_kd else sampling_config
    if not config.use_uld_loss:
        distillation._check_teacher(model, teacher_model)
    teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else tokenizer
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    examples = distillation.prepare_dataset(dataset, tokenizer, data_config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        fmt = data.require_format(eval_dataset, ("prompt_only", "prompt_completion", "language_modeling"),
                                  method="GOLD")
        if fmt.kind == "prompt_only":
            raise ValueError("GOLD evaluates off-policy on the eval dataset's own completions (as TRL's), but "
                             "eval_dataset is prompt-only: use prompt-completion or messages data, or "
                             "eval_strategy='no'.")
        eval_examples = distillation.prepare_dataset(eval_dataset, tokenizer, sampling_config.replace(lmbda=0.0))
    distributed.check_same_data(examples, what="GOLD examples")
    if config.use_uld_loss:
        for example in examples + (eval_examples or []):
            example["teacher_prompt_ids"] = teacher_prompt_ids(example.get("completion_prompt_ids",
                                                                           example["prompt_ids"]),
                                                               tokenizer, teacher_tokenizer)
            example["teacher_sampling_prompt_ids"] = teacher_prompt_ids(example["prompt_ids"], tokenizer,
                                                                        teacher_tokenizer)
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="GOLD")
    total_steps = data.total_steps(config, steps_in_epoch)
    longest_prompt = max(max(len(e["prompt_ids"]), len(e.get("completion_prompt_ids", ())),
                             len(e.get("teacher_prompt_ids", ())), len(e.get("teacher_sampling_prompt_ids", ())))
                         for e in examples + (eval_examples or []))
    prompt_buckets = data.length_buckets(max(longest_prompt, 16), min_length=16)
    completion_buckets = data.length_buckets(config.max_completion_length, min_length=16)
    keys = ("prompt_ids", "completion_prompt_ids", "completion_ids") if data_config.lmbda < 1.0 else ("prompt_ids",)
    data.check_model_fits(model, examples, keys, method="GOLD", longest=longest_prompt,
                          length_fields="max_prompt_length + max_completion_length",
                          extra_length=config.max_completion_length,
                          extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))
    teacher_keys = ("teacher_prompt_ids", "teacher_sampling_prompt_ids") if config.use_uld_loss else keys
    data.check_model_fits(teacher_model, examples, teacher_keys, method="GOLD", longest=longest_prompt,
                          length_fields="max_prompt_length + max_completion_length",
                          extra_length=config.max_completion_length,  # with ULD an estimate: the teacher's own count
                          extra_ids=(teacher_tokenizer.eos_token_id, data.pad_token_id(teacher_tokenizer)))
    if eval_examples:
        eval_keys = ("completion_prompt_ids", "completion_ids")
        for checked, keys_checked, eos_tokenizer in ((model, eval_keys, tokenizer), (
                teacher_model, ("teacher_prompt_ids",) if config.use_uld_loss else eval_keys, teacher_tokenizer)):
            data.check_model_fits(checked, eval_examples, keys_checked, method="GOLD", longest=longest_prompt,
                                  length_fields="max_prompt_length + max_completion_length",
                                  extra_length=config.max_completion_length,
                                  extra_ids=(eos_tokenizer.eos_token_id, data.pad_token_id(eos_tokenizer)))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    teacher_graphdef, teacher_params = nnx.split(teacher_model, nnx.Param)
    teacher_sharding = distillation.teacher_shardings(teacher_params, teacher_model, mesh)
    if mesh is not None:
        teacher_params = jax.device_put(teacher_params, teacher_sharding)
    if config.use_uld_loss:
        hybrid = None
        if config.uld_use_hybrid_loss:
            hybrid = hybrid_vocabulary(tokenizer, teacher_tokenizer,
                                       student_vocab_size=model.lm_head_weight().shape[0],
                                       teacher_vocab_size=teacher_model.lm_head_weight().shape[0])
        train_step = make_uld_train_step(config, teacher_graphdef=teacher_graphdef, hybrid=hybrid, mesh=mesh,
                                         state_sharding=state_sharding, teacher_sharding=teacher_sharding)
        eval_step = make_uld_eval_step(config, teacher_graphdef=teacher_graphdef, hybrid=hybrid, mesh=mesh,
                                       state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    else:
        train_step = distillation.make_train_step(sampling_config, teacher_graphdef=teacher_graphdef, mesh=mesh,
                                                  state_sharding=state_sharding, teacher_sharding=teacher_sharding)
        eval_step = distillation.make_eval_step(sampling_config, teacher_graphdef=teacher_graphdef, mesh=mesh,
                                                state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="gold", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="gold", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            chosen = [examples[i] for i in indices]
            key = jax.random.fold_in(base_key, step)
            on_policy = distillation.is_on_policy_step(step, sampling_config)
            if on_policy:
                arrays, completion_stats = distillation.sample_completions(
                    state, chosen, tokenizer, sampling_config, key=key, mesh=mesh, prompt_buckets=prompt_buckets)
            elif config.seq_kd:
                arrays, completion_stats = _teacher_samples(teacher_graphdef, teacher_params, chosen, tokenizer,
                                                            sampling_config, key=key, mesh=mesh,
                                                            prompt_buckets=prompt_buckets)
            else:
                arrays, completion_stats = distillation.dataset_completions(
                    chosen, tokenizer, prompt_buckets=prompt_buckets, completion_buckets=completion_buckets)
            if config.log_completions:
                distillation._log_completions(sampling_config, step, chosen, arrays, tokenizer)
            if config.use_uld_loss:
                prompts_key = "teacher_sampling_prompt_ids" if on_policy else "teacher_prompt_ids"
                arrays = uld_batch(arrays, [e[prompts_key] for e in chosen], tokenizer, teacher_tokenizer, config)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            batch = {k: v.reshape(config.gradient_accumulation_steps, micro_batch, *v.shape[1:])
                     for k, v in arrays.items()}
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True),
                                        teacher_params)
            done = step + 1
            metrics = {**metrics, ("on_policy_loss" if on_policy else "off_policy_loss"): metrics["loss"]}
            log.log(done, {**metrics, **completion_stats, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, teacher_params, eval_examples, tokenizer,
                                                    teacher_tokenizer, config, mesh=mesh, prompt_buckets=prompt_buckets,
                                                    completion_buckets=completion_buckets)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def _teacher_samples(teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State, examples: Sequence[dict], tokenizer,
                     config: distillation.DistillationConfig, *, key: jax.Array, mesh,
                     prompt_buckets: Sequence[int]) -> tuple[dict[str, np.ndarray], dict]:
    """`seq_kd` (same tokenizer): the teacher samples one completion per prompt with the sampling options, in
    `jaxpt.distillation.sample_completions`' layout."""
    pad_id = data.pad_token_id(tokenizer)
    length = data.bucket_length(max(len(e["prompt_ids"]) for e in examples), prompt_buckets)
    prompt_ids = data.pad_rows([e["prompt_ids"] for e in examples], length, pad_id, left=True)
    prompt_mask = data.pad_rows([[1] * len(e["prompt_ids"]) for e in examples], length, 0, left=True)
    out = generate(teacher_graphdef, teacher_params, prompt_ids, prompt_mask, key=key,
                   max_new_tokens=config.max_completion_length, temperature=config.temperature,
                   top_k=config.top_k or None, top_p=config.top_p if config.top_p < 1.0 else None,
                   eos_token_ids=eos_token_ids(tokenizer), pad_token_id=pad_id, mesh=mesh)
    completion_ids, attention_mask, lengths, finished = (host_array(a) for a in (
        out.completion_ids, out.completion_mask, out.lengths, out.finished))
    attention_mask = np.asarray(attention_mask, np.int32)
    arrays = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": np.asarray(completion_ids),
              "attention_mask": attention_mask, "completion_mask": attention_mask.copy()}
    return arrays, completion_metrics(lengths, finished)
