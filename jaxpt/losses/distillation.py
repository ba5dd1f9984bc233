"""Knowledge-distillation loss: the generalized Jensen-Shannon divergence between the student's and the teacher's
next-token distributions (On-Policy Distillation of Language Models, Agarwal et al. 2024, arXiv:2306.13649), with
TRL's `DistillationTrainer` convention for `beta`:

    p_s = softmax(z_s / T),  p_t = softmax(z_t / T),  m = (1 - beta) p_s + beta p_t
    D_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)        for 0 < beta < 1
    D_0 = KL(p_t || p_s)   (forward KL)        D_1 = KL(p_s || p_t)   (reverse KL)
    L = (1/N) sum_t mask_t D_beta(t)

`T` is `temperature` (no T^2 factor, as TRL), `N` the loss tokens of the batch, or `num_tokens` (the tokens of the
whole accumulated batch, TRL's `num_items_in_batch`) so that micro-batch losses add up to the big-batch loss. The
teacher is a constant: gradients reach the student only.

Metric (TRL's name): `entropy`, the mean entropy of the student's `p_s` over the loss tokens; with
`return_counts=True` a `(sum, count)` pair (`jaxpt.losses.metrics`).

`distillation_loss` takes logits `[batch, seq, vocab]`; `distillation_loss_from_hidden` takes both models' final
hidden states and output projections and computes the same numbers a stretch of tokens at a time, data-parallel
under a mesh (`logprobs._on_own_rows`), recomputing each chunk's logits in the backward pass, so `[tokens, vocab]`
logits exist for one chunk of each model at a time, never for the batch. The teacher may be wider or narrower
than the student; only the vocabulary must match.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpt.losses.logprobs import _on_own_rows, _row_chunks
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1] (0: forward KL, 0.5: JSD, 1: reverse KL).")


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 1.0,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-position divergence `D_beta` and student entropy, float32, shape `logits.shape[:-1]`.

    Logits `[..., vocab]` of the student and the teacher (same vocabulary); the teacher's go under
    `stop_gradient`. The entropy is a metric (under `stop_gradient`)."""
    _check_beta(beta)
    student = student_logits.astype(jnp.float32) / temperature
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    log_ps = jax.nn.log_softmax(student, axis=-1)
    log_pt = jax.nn.log_softmax(teacher, axis=-1)
    ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
    entropy = jax.lax.stop_gradient(-jnp.sum(ps * log_ps, axis=-1))
    if beta == 0.0:
        divergence = jnp.sum(pt * (log_pt - log_ps), axis=-1)
    elif beta == 1.0:
        divergence = jnp.sum(ps * (log_ps - log_pt), axis=-1)
    else:
        log_m = jnp.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
        divergence = jnp.sum(beta * pt * (log_pt - log_m) + (1.0 - beta) * ps * (log_ps - log_m), axis=-1)
    return divergence, entropy


def _reduce(divergence, entropy, mask, num_tokens, return_counts):
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count if num_tokens is None else jnp.asarray(num_tokens, jnp.float32), 1.0)
    loss = jnp.sum(jnp.where(mask > 0, divergence, 0.0) * mask) / denominator
    metrics = {"entropy": sum_and_count(jnp.where(mask > 0, entropy, 0.0), mask)}
    return loss, metrics if return_counts else mean_metrics(metrics)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    completion_mask: jax.Array,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """Generalized-JSD distillation loss from logits `[batch, seq, vocab]` of both models and a mask `[batch, seq]`
    of the positions trained on (each position's logits predict the token after it)."""
    divergence, entropy = generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
    return _reduce(divergence, entropy, completion_mask, num_tokens, return_counts)


def _project(hidden_chunk, weight, logit_softcap, temperature):
    """float32 logits `[chunk, vocab]` of one chunk, softcapped (Gemma 2), divided by the temperature."""
    logits = jax.lax.dot_general(hidden_chunk, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits / temperature


def distillation_loss_from_hidden(
    student_hidden_states: jax.Array,
    student_lm_head_weight: jax.Array,
    teacher_hidden_states: jax.Array,
    teacher_lm_head_weight: jax.Array,
    completion_mask: jax.Array,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    num_tokens: jax.Array | float | None = None,
    student_logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    chunk_size: int = 1024,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """`distillation_loss` from final hidden states: student `[batch, seq, hidden_s]` with its output projection
    `[vocab, hidden_s]`, teacher `[batch, seq, hidden_t]` with `[vocab, hidden_t]` (`model.lm_head_weight()`),
    aligned so that position t of each predicts the same token. About `chunk_size` tokens (per device, under a
    mesh) are projected at a time; the backward pass recomputes each chunk's logits instead of keeping them."""
    _check_beta(beta)
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(f"The student's vocabulary ({student_lm_head_weight.shape[0]}) and the teacher's "
                         f"({teacher_lm_head_weight.shape[0]}) differ: distillation compares their next-token "
                         "distributions token by token, so they need the same vocabulary (tokenizer).")
    temperature = float(temperature)
    compute_dtype = student_hidden_states.dtype

    def one_chunk(student_chunk, teacher_chunk, student_weight, teacher_weight):
        student_logits = _project(student_chunk, student_weight, student_logit_softcap, temperature)
        teacher_logits = _project(teacher_chunk, teacher_weight, teacher_logit_softcap, temperature)
        # the temperature is already applied: 1.0 here
        return generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=1.0)

    # Only the chunk's inputs are kept for the backward pass, which projects the chunk again.
    one_chunk = jax.checkpoint(one_chunk)

    def local(student_hidden, teacher_hidden, student_weight, teacher_weight):
        student_chunks, teacher_chunks, unchunked = _row_chunks(chunk_size, student_hidden,
                                                                teacher_hidden.astype(compute_dtype))

        def scan_body(_, chunks):
            return None, one_chunk(*chunks, student_weight, teacher_weight)

        _, (divergence, entropy) = jax.lax.scan(scan_body, None, (student_chunks, teacher_chunks))
        return unchunked(divergence), unchunked(entropy)

    teacher_hidden = jax.lax.stop_gradient(teacher_hidden_states)
    teacher_weight = jax.lax.stop_gradient(teacher_lm_head_weight)
    divergence, entropy = _on_own_rows(local, (student_hidden_states, teacher_hidden),
                                       (student_lm_head_weight, teacher_weight), compute_dtype)
    return _reduce(divergence, jax.lax.stop_gradient(entropy), completion_mask, num_tokens, return_counts)
