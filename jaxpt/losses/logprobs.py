"""Token log-probabilities, entropies and masked reductions: the arithmetic every loss shares.

Conventions that keep XLA fast on every backend:
- targets are aligned with the logits over the full sequence (`next_token_targets` shifts the ids left and
  masks the last position), instead of slicing `logits[:, :-1]`: the slice plus `take_along_axis` turns into a
  scatter in the backward pass;
- the target logit is picked with a one-hot comparison against an iota, which fuses with the log-softmax;
- all log-softmax arithmetic is float32, whatever the compute dtype;
- `chunked_token_logps` goes from final hidden states to log-probs a chunk of tokens at a time, with a
  hand-written backward pass, so `[batch, seq, vocab]` float32 logits never exist at once;
- the chunked functions are data-parallel: under a mesh (the abstract mesh a train step is traced in), each
  device computes the log-probs of its own rows (`shard_map` over the batch axes), chunking along the sequence,
  with the output projection gathered once per call and its gradient reduced once. Chunking the global token
  axis instead made XLA shard the hidden dimension and all-reduce every `[chunk, vocab]` logits buffer.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


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


# The mesh axes a batch is split over: `jaxpt.sharding.BATCH_AXES` (losses import nothing of jaxpt).
BATCH_AXES = ("data", "fsdp")


def _row_chunks(chunk_size, hidden_states, *per_token):
    """`hidden_states` `[rows, seq, hidden]` and `per_token` `[rows, seq]` arrays -> `[num_chunks, rows * length,
    ...]` chunks along the sequence, followed by the inverse map for per-token outputs `[num_chunks, rows * length]
    -> [rows, seq]`.

    A chunk holds `length = max(1, chunk_size // rows)` positions of every row (at most `seq`), so about
    `chunk_size` tokens (never fewer than one per row): under a mesh, `rows` are the device's own rows and
    `chunk_size` bounds each device's `[tokens, vocab]` logits buffer. The sequence is padded to a multiple of
    `length`; padded positions get zeros (target 0, weight 0), and their outputs are dropped.
    """
    rows, seq, _ = hidden_states.shape
    length = max(1, min(seq, chunk_size // rows))
    num_chunks = -(-seq // length)
    padding = num_chunks * length - seq

    def chunked(x):
        if padding:
            x = jnp.pad(x, ((0, 0), (0, padding)) + ((0, 0),) * (x.ndim - 2))
        x = jnp.swapaxes(x.reshape(rows, num_chunks, length, *x.shape[2:]), 0, 1)
        return x.reshape(num_chunks, rows * length, *x.shape[3:])

    def unchunked(x):
        return jnp.swapaxes(x.reshape(num_chunks, rows, length), 0, 1).reshape(rows, num_chunks * length)[:, :seq]

    return (chunked(hidden_states), *(chunked(x) for x in per_token), unchunked)


def _on_own_rows(local, row_args, shared_args, compute_dtype):
    """`local(*row_args, *shared_args)` with each device on its own rows, under the active mesh.

    `row_args` are `[rows, ...]` arrays split over the mesh's batch axes; `shared_args` (the output projection
    `[vocab, hidden]`, in its parameter dtype) reach `local` whole, cast to `compute_dtype`. Every output of
    `local` has the rows as its leading axis (a per-device partial sum is returned as `[1]` and summed by the
    caller). A shared argument enters split over the batch axes along a dimension they divide (the hidden one
    first, as the FSDP rules store it) and is all-gathered in `compute_dtype` inside (`_gather_shared`), once per
    call; its gradient, a per-device partial sum, is reduce-scattered back to that split, in float32. One that no
    dimension of divides is gathered whole by XLA and its gradient all-reduced. Without a mesh, or when its batch
    axes do not divide the rows, `local` runs on the global arrays (XLA places it).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rows = row_args[0].shape[0]
    axes = () if mesh.empty else tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    ways = math.prod(mesh.shape[axis] for axis in axes)
    if ways == 1 or rows % ways:
        return local(*row_args, *(x.astype(compute_dtype) for x in shared_args))

    split_dims = [next((dim for dim in reversed(range(x.ndim)) if x.shape[dim] % ways == 0), None)
                  for x in shared_args]

    def per_device(*args):
        own_rows, shared = args[:len(row_args)], args[len(row_args):]
        whole = [jax.lax.pcast(x.astype(compute_dtype), axes, to="varying") if dim is None
                 else _gather_shared(x, axes, dim, jnp.dtype(compute_dtype))
                 for x, dim in zip(shared, split_dims, strict=True)]
        return local(*own_rows, *whole)

    def split(x, dim):
        return PartitionSpec() if dim is None else PartitionSpec(*(axes if d == dim else None for d in range(x.ndim)))

    in_specs = (PartitionSpec(axes),) * len(row_args) + tuple(map(split, shared_args, split_dims))
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(axes))(*row_args,
                                                                                                 *shared_args)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_shared(shard, axes, dim, compute_dtype):
    """Inside `shard_map`: `shard` (this device's slice along `dim`) gathered over `axes` in `compute_dtype`, cast
    first so a bfloat16 step moves bfloat16. The gradient's per-device partial sums are reduce-scattered back to
    the slices in float32 (the transpose of a gather), never all-reduced at full size."""
    return jax.lax.all_gather(shard.astype(compute_dtype), axes, axis=dim, tiled=True)


def _gather_shared_fwd(shard, axes, dim, compute_dtype):
    return _gather_shared(shard, axes, dim, compute_dtype), jnp.zeros((), shard.dtype)


def _gather_shared_bwd(axes, dim, compute_dtype, like, d_whole):
    d_shard = jax.lax.psum_scatter(d_whole.astype(jnp.float32), axes, scatter_dimension=dim, tiled=True)
    return (d_shard.astype(like.dtype),)


_gather_shared.defvjp(_gather_shared_fwd, _gather_shared_bwd)


def _chunk_logits(hidden_chunk, weight, logit_softcap, temperature):
    """float32 logits `[chunk, vocab]` and the pre-softcap ones (needed by the backward pass)."""
    raw = jax.lax.dot_general(hidden_chunk, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = raw if logit_softcap is None else jnp.tanh(raw / logit_softcap) * logit_softcap
    if temperature != 1.0:
        logits = logits / temperature
    return raw, logits


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_logps(hidden, weight, targets, logit_softcap, temperature, entropy_gradient=False):
    logps, entropy = _chunked_forward(hidden, weight, targets, logit_softcap, temperature)
    return logps, entropy


def _chunked_forward(hidden, weight, targets, logit_softcap, temperature):
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


def _chunked_fwd(hidden, weight, targets, logit_softcap, temperature, entropy_gradient=False):
    out = _chunked_forward(hidden, weight, targets, logit_softcap, temperature)
    return out, (hidden, weight, targets)


def _chunked_bwd(logit_softcap, temperature, entropy_gradient, residuals, cotangents):
    hidden, weight, targets = residuals
    d_logps, d_entropy = cotangents  # without entropy_gradient the entropy is a metric: its cotangent is ignored
    if not entropy_gradient:
        d_entropy = jnp.zeros_like(d_logps)

    def one_chunk(d_weight, inputs):
        hidden_chunk, target_chunk, d_chunk, d_entropy_chunk = inputs
        raw, logits = _chunk_logits(hidden_chunk, weight, logit_softcap, temperature)
        probs = jax.nn.softmax(logits, axis=-1)
        vocab = jnp.arange(logits.shape[-1], dtype=target_chunk.dtype)
        one_hot = (vocab == target_chunk[:, None]).astype(jnp.float32)
        d_logits = d_chunk[:, None] * (one_hot - probs)  # d logp / d logits
        if entropy_gradient:  # H = -sum p log p, so dH / d logits_j = -p_j (log p_j + H)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            entropy = -jnp.sum(probs * log_probs, axis=-1, keepdims=True)
            d_logits = d_logits - d_entropy_chunk[:, None] * probs * (log_probs + entropy)
        if temperature != 1.0:
            d_logits = d_logits / temperature
        if logit_softcap is not None:
            d_logits = d_logits * (1.0 - jnp.tanh(raw / logit_softcap) ** 2)
        d_hidden = jnp.dot(d_logits, weight.astype(jnp.float32), preferred_element_type=jnp.float32)
        d_weight = d_weight + jax.lax.dot_general(
            d_logits, hidden_chunk.astype(jnp.float32), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return d_weight, d_hidden.astype(hidden_chunk.dtype)

    d_weight0 = jnp.zeros_like(weight, jnp.float32)  # like weight: device-varying inside shard_map
    d_weight, d_hidden = jax.lax.scan(one_chunk, d_weight0, (hidden, targets, d_logps, d_entropy))
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
    entropy_gradient: bool = False,
):
    """`token_logps(project(hidden_states, weight), target_ids)` without holding the full logits.

    hidden_states `[batch, seq, hidden]` (final, normed), weight `[vocab, hidden]` (the model's
    `lm_head_weight()`), target_ids `[batch, seq]`. About `chunk_size` tokens are processed at a time (a chunk
    is a stretch of the sequence of every row: see `_row_chunks`); the backward pass recomputes each chunk's
    logits, so peak memory is about `chunk_size * vocab` floats (per device, under a mesh), not
    `batch * seq * vocab`. `logit_softcap` is the model's `final_logit_softcap` (Gemma 2).
    With `return_entropy`, also the per-token entropy: a metric, not differentiated, unless `entropy_gradient`
    (an entropy bonus in the loss, GRPO's `entropy_coef`), whose backward pass adds `dH/dlogits` in the same chunks.
    """

    def local(hidden_states, target_ids, weight):
        hidden, targets, unchunked = _row_chunks(chunk_size, hidden_states, target_ids.astype(jnp.int32))
        logps, entropy = _chunked_logps(hidden, weight, targets, logit_softcap, float(temperature),
                                        entropy_gradient)
        return unchunked(logps), unchunked(entropy)

    logps, entropy = _on_own_rows(local, (hidden_states, target_ids), (weight,), hidden_states.dtype)
    if not return_entropy:
        return logps
    return logps, entropy if entropy_gradient else jax.lax.stop_gradient(entropy)


TOKEN_STATS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _token_stats(logits, lse, target_chunk, stats):
    """Per-token statistics of float32 logits `[chunk, vocab]` (no gradient flows through them)."""
    out = []
    for name in stats:
        if name == "entropy":
            out.append(lse - jnp.sum(jnp.exp(logits - lse[:, None]) * logits, axis=-1))
        elif name == "mean_logits":
            out.append(jnp.mean(logits, axis=-1))
        elif name == "is_top1":  # the first maximum, as torch.argmax / TRL's fused head count ties
            out.append((jnp.argmax(logits, axis=-1) == target_chunk).astype(jnp.float32))
        else:  # log_sum_sq_probs: log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
            out.append(jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse)
    return tuple(out)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_logps_stats(hidden, weight, targets, logit_softcap, temperature, stats):
    return _chunked_stats_forward(hidden, weight, targets, logit_softcap, temperature, stats)


def _chunked_stats_forward(hidden, weight, targets, logit_softcap, temperature, stats):
    def one_chunk(_, inputs):
        hidden_chunk, target_chunk = inputs
        _, logits = _chunk_logits(hidden_chunk, weight, logit_softcap, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return None, (_pick(logits, target_chunk) - lse, _token_stats(logits, lse, target_chunk, stats))

    _, (logps, per_token) = jax.lax.scan(one_chunk, None, (hidden, targets))
    return logps, per_token


def _chunked_stats_fwd(hidden, weight, targets, logit_softcap, temperature, stats):
    out = _chunked_stats_forward(hidden, weight, targets, logit_softcap, temperature, stats)
    return out, (hidden, weight, targets)


def _chunked_stats_bwd(logit_softcap, temperature, stats, residuals, cotangents):
    # the statistics are metrics/weights: only the log-probs are differentiated (same backward pass)
    return _chunked_bwd(logit_softcap, temperature, False, residuals, (cotangents[0], None))


_chunked_logps_stats.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)


def chunked_token_logps_and_stats(
    hidden_states: jax.Array,
    weight: jax.Array,
    target_ids: jax.Array,
    *,
    stats: tuple[str, ...] = ("entropy", "mean_logits", "is_top1"),
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`chunked_token_logps` plus per-token statistics of the predictive distribution, computed in the same pass
    over each chunk's logits: `(logps [batch, seq], {name: [batch, seq]})`, the statistics under `stop_gradient`.

    `stats` is any of `TOKEN_STATS`: `entropy`; `mean_logits` (the mean logit over the vocabulary, what TRL logs as
    `logits/chosen`); `is_top1` (1.0 where the target is the first argmax); `log_sum_sq_probs` (`log sum_v p_v^2`,
    the WPO weight's normaliser). Each costs one more reduction over the vocabulary per token.
    """
    unknown = [name for name in stats if name not in TOKEN_STATS]
    if unknown:
        raise ValueError(f"stats={tuple(stats)}: unknown {unknown}; choose from {TOKEN_STATS}.")

    def local(hidden_states, target_ids, weight):
        hidden, targets, unchunked = _row_chunks(chunk_size, hidden_states, target_ids.astype(jnp.int32))
        logps, per_token = _chunked_logps_stats(hidden, weight, targets, logit_softcap, float(temperature),
                                                tuple(stats))
        return unchunked(logps), tuple(unchunked(x) for x in per_token)

    logps, per_token = _on_own_rows(local, (hidden_states, target_ids), (weight,), hidden_states.dtype)
    return logps, {name: jax.lax.stop_gradient(x) for name, x in zip(stats, per_token, strict=True)}


# --------------------------------------------------------------------------------------------------------------
# Fused weighted NLL from hidden states (gradients computed in the forward pass)
# --------------------------------------------------------------------------------------------------------------


def _weighted_nll_chunks(hidden, weight, targets, weights, logit_softcap, temperature, prob_weighted, with_metrics,
                         with_grads):
    """Scan over token chunks: loss, per-token logps, entropy and top-1 hits (with_metrics), and (with_grads)
    d loss / d hidden, d weight."""

    def one_chunk(d_weight, inputs):
        hidden_chunk, target_chunk, weight_chunk = inputs
        raw, logits = _chunk_logits(hidden_chunk, weight, logit_softcap, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jnp.exp(logits - lse[:, None])
        target_logits = _pick(logits, target_chunk)
        logps = target_logits - lse
        if with_metrics:
            entropy = lse - jnp.sum(probs * logits, axis=-1)
            # the first maximum, as torch.argmax / TRL's mean_token_accuracy (ties are not hits)
            is_argmax = (jnp.argmax(logits, axis=-1) == target_chunk).astype(jnp.float32)
        else:
            entropy = is_argmax = jnp.zeros_like(lse)
        token_scale = weight_chunk * jnp.exp(logps) if prob_weighted else weight_chunk
        loss = -jnp.sum(token_scale * logps)
        if not with_grads:
            return d_weight, (loss, logps, entropy, is_argmax, None)
        vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        one_hot = (vocab == target_chunk[:, None]).astype(jnp.float32)
        d_logits = -token_scale[:, None] * (one_hot - probs)  # d loss / d logits; the DFT scale is a constant
        if temperature != 1.0:
            d_logits = d_logits / temperature
        if logit_softcap is not None:
            d_logits = d_logits * (1.0 - jnp.tanh(raw / logit_softcap) ** 2)
        d_hidden = jnp.dot(d_logits, weight.astype(jnp.float32), preferred_element_type=jnp.float32)
        d_weight = d_weight + jax.lax.dot_general(
            d_logits, hidden_chunk.astype(jnp.float32), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return d_weight, (loss, logps, entropy, is_argmax, d_hidden.astype(hidden_chunk.dtype))

    d_weight0 = jnp.zeros_like(weight, jnp.float32) if with_grads else None  # like weight: device-varying in shard_map
    d_weight, (losses, logps, entropy, is_argmax, d_hidden) = jax.lax.scan(one_chunk, d_weight0,
                                                                           (hidden, targets, weights))
    return jnp.sum(losses), (logps, entropy, is_argmax), d_hidden, d_weight


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _weighted_nll(hidden, weight, targets, weights, logit_softcap, temperature, prob_weighted, with_metrics):
    loss, per_token, _, _ = _weighted_nll_chunks(hidden, weight, targets, weights, logit_softcap, temperature,
                                                 prob_weighted, with_metrics, with_grads=False)
    return loss, per_token


def _weighted_nll_fwd(hidden, weight, targets, weights, logit_softcap, temperature, prob_weighted, with_metrics):
    loss, per_token, d_hidden, d_weight = _weighted_nll_chunks(
        hidden, weight, targets, weights, logit_softcap, temperature, prob_weighted, with_metrics, with_grads=True
    )
    return (loss, per_token), (d_hidden, d_weight.astype(weight.dtype))


def _weighted_nll_bwd(logit_softcap, temperature, prob_weighted, with_metrics, residuals, cotangents):
    d_hidden, d_weight = residuals
    d_loss = cotangents[0]  # the per-token outputs are returned under stop_gradient: their cotangents are zero
    return (d_loss * d_hidden).astype(d_hidden.dtype), (d_loss * d_weight).astype(d_weight.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def weighted_nll_from_hidden(
    hidden_states: jax.Array,
    weight: jax.Array,
    target_ids: jax.Array,
    token_weights: jax.Array,
    *,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    prob_weighted: bool = False,
    with_metrics: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`-sum_t token_weights[t] * log p(target_t)` straight from hidden states, for losses linear in log-probs.

    Returns `(loss, per_token)`: the scalar loss (differentiable with respect to `hidden_states` and `weight`)
    and a dict of `[batch, seq]` arrays under `stop_gradient`: `logps`, and with `with_metrics` also `entropy`
    (of the predictive distribution) and `is_argmax` (1.0 where the target is the top-1 token).
    `token_weights` `[batch, seq]` are constants (e.g. `loss_mask / num_tokens`). With `prob_weighted`, each
    token is also weighted by `stop_gradient(p(target_t))`, the DFT loss of Wu et al. 2025.

    Because the loss is linear in the log-probs with known weights, the gradient is computed in the forward
    pass, chunk by chunk (the "fused linear cross-entropy" of Liger / Cut Cross-Entropy): three matmuls per
    chunk instead of four, one pass over each chunk's logits, and no `[batch, seq, vocab]` buffer. Losses that
    are not linear in the log-probs (DPO, GRPO) use `chunked_token_logps`.
    """

    def local(hidden_states, target_ids, token_weights, weight):
        hidden, targets, weights, unchunked = _row_chunks(chunk_size, hidden_states, target_ids.astype(jnp.int32),
                                                          token_weights.astype(jnp.float32))
        loss, per_token = _weighted_nll(hidden, weight, targets, weights, logit_softcap, float(temperature),
                                        bool(prob_weighted), bool(with_metrics))
        return loss[None], tuple(unchunked(x) for x in per_token)  # this device's share of the loss

    losses, (logps, entropy, is_argmax) = _on_own_rows(
        local, (hidden_states, target_ids, jax.lax.stop_gradient(token_weights)), (weight,), hidden_states.dtype
    )
    per_token = {"logps": jax.lax.stop_gradient(logps)}
    if with_metrics:
        per_token.update(entropy=jax.lax.stop_gradient(entropy), is_argmax=jax.lax.stop_gradient(is_argmax))
    return jnp.sum(losses), per_token
