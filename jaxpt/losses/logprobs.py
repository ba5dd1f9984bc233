"""Token log-probabilities, entropies and masked reductions: the arithmetic every loss shares.

Conventions that keep XLA fast on every backend:
- targets are aligned with the logits over the full sequence (`next_token_targets` shifts the ids left and
  masks the last position), instead of slicing `logits[:, :-1]`: the slice plus `take_along_axis` turns into a
  scatter in the backward pass;
- the target logit is picked with a one-hot comparison against an iota, which fuses with the log-softmax;
- all log-softmax arithmetic is float32, whatever the compute dtype;
- `chunked_token_logps` goes from final hidden states to log-probs a chunk of tokens at a time, with a
  hand-written backward pass, so `[batch, seq, vocab]` float32 logits never exist at once.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def next_token_targets(input_ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Targets `[batch, seq]` for next-token prediction and their mask.

    `targets[:, t] = input_ids[:, t + 1]`; the last position has no target (mask 0). If `mask` marks which
    tokens are to be predicted (a loss / completion mask over `input_ids`), it is shifted the same way.
    """
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    if mask is None:
        mask = jnp.ones(input_ids.shape, jnp.int32)
    target_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    return targets, target_mask


def _pick(logits: jax.Array, target_ids: jax.Array) -> jax.Array:
    """`logits[..., target]` via a one-hot comparison (fuses; no gather/scatter)."""
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.sum(jnp.where(vocab == target_ids.astype(jnp.int32)[..., None], logits, 0.0), axis=-1)


def token_logps(logits: jax.Array, target_ids: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """`log softmax(logits / temperature)[target]`, float32, shape of `target_ids` (`[batch, seq]`)."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    return _pick(logits, target_ids) - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of `softmax(logits / temperature)` per position, float32 (`[batch, seq]`)."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_sum(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask.astype(bool), values, 0.0), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `values` where `mask` is set (0 when nothing is)."""
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return masked_sum(values, mask, axis=axis) / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Chunked log-probs from hidden states
# --------------------------------------------------------------------------------------------------------------


def _chunk_logits(hidden_chunk, weight, logit_softcap, temperature):
    """float32 logits `[chunk, vocab]` and the pre-softcap ones (needed by the backward pass)."""
    raw = jax.lax.dot_general(hidden_chunk, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = raw if logit_softcap is None else jnp.tanh(raw / logit_softcap) * logit_softcap
    if temperature != 1.0:
        logits = logits / temperature
    return raw, logits


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_logps(hidden, weight, targets, chunk_size, logit_softcap, temperature):
    logps, entropy = _chunked_forward(hidden, weight, targets, chunk_size, logit_softcap, temperature)
    return logps, entropy


def _chunked_forward(hidden, weight, targets, chunk_size, logit_softcap, temperature):
    # hidden [n_chunks, chunk, hidden], targets [n_chunks, chunk]
    def one_chunk(_, inputs):
        hidden_chunk, target_chunk = inputs
        _, logits = _chunk_logits(hidden_chunk, weight, logit_softcap, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        logps = _pick(logits, target_chunk) - lse
        probs = jnp.exp(logits - lse[:, None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        return None, (logps, entropy)

    _, (logps, entropy) = jax.lax.scan(one_chunk, None, (hidden, targets))
    return logps, entropy


def _chunked_fwd(hidden, weight, targets, chunk_size, logit_softcap, temperature):
    out = _chunked_forward(hidden, weight, targets, chunk_size, logit_softcap, temperature)
    return out, (hidden, weight, targets)


def _chunked_bwd(chunk_size, logit_softcap, temperature, residuals, cotangents):
    hidden, weight, targets = residuals
    d_logps, _ = cotangents  # entropy is a metric: its cotangent is ignored

    def one_chunk(d_weight, inputs):
        hidden_chunk, target_chunk, d_chunk = inputs
        raw, logits = _chunk_logits(hidden_chunk, weight, logit_softcap, temperature)
        probs = jax.nn.softmax(logits, axis=-1)
        vocab = jnp.arange(logits.shape[-1], dtype=target_chunk.dtype)
        one_hot = (vocab == target_chunk[:, None]).astype(jnp.float32)
        d_logits = d_chunk[:, None] * (one_hot - probs)  # d logp / d logits
        if temperature != 1.0:
            d_logits = d_logits / temperature
        if logit_softcap is not None:
            d_logits = d_logits * (1.0 - jnp.tanh(raw / logit_softcap) ** 2)
        d_hidden = jnp.dot(d_logits, weight.astype(jnp.float32), preferred_element_type=jnp.float32)
        d_weight = d_weight + jax.lax.dot_general(
            d_logits, hidden_chunk.astype(jnp.float32), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return d_weight, d_hidden.astype(hidden_chunk.dtype)

    d_weight0 = jnp.zeros(weight.shape, jnp.float32)
    d_weight, d_hidden = jax.lax.scan(one_chunk, d_weight0, (hidden, targets, d_logps))
    return d_hidden, d_weight.astype(weight.dtype), None


_chunked_logps.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_logps(
    hidden_states: jax.Array,
    weight: jax.Array,
    target_ids: jax.Array,
    *,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """`token_logps(project(hidden_states, weight), target_ids)` without holding the full logits.

    hidden_states `[batch, seq, hidden]` (final, normed), weight `[vocab, hidden]` (the model's
    `lm_head_weight()`), target_ids `[batch, seq]`. Tokens are processed `chunk_size` at a time; the backward
    pass recomputes each chunk's logits, so peak memory is `chunk_size * vocab` floats, not
    `batch * seq * vocab`. `logit_softcap` is the model's `final_logit_softcap` (Gemma 2).
    With `return_entropy`, also the per-token entropy (a metric: not differentiated).
    """
    batch, seq, features = hidden_states.shape
    tokens = batch * seq
    chunk_size = min(chunk_size, tokens)
    num_chunks = -(-tokens // chunk_size)
    padding = num_chunks * chunk_size - tokens
    flat_hidden = hidden_states.reshape(tokens, features)
    flat_targets = target_ids.reshape(tokens).astype(jnp.int32)
    if padding:
        flat_hidden = jnp.pad(flat_hidden, ((0, padding), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, padding))
    logps, entropy = _chunked_logps(
        flat_hidden.reshape(num_chunks, chunk_size, features),
        weight.astype(hidden_states.dtype),
        flat_targets.reshape(num_chunks, chunk_size),
        chunk_size,
        logit_softcap,
        float(temperature),
    )
    logps = logps.reshape(-1)[:tokens].reshape(batch, seq)
    if not return_entropy:
        return logps
    return logps, jax.lax.stop_gradient(entropy.reshape(-1)[:tokens].reshape(batch, seq))
