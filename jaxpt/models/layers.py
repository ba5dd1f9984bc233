"""Building blocks shared by every model family: what is truly the same across families.

Each family file (`llama.py`, `qwen2.py`, ...) reads top to bottom like its `transformers` counterpart and
uses these pieces:

- `Linear` and `Embed` keep Hugging Face's parameter layout (`weight` is `[out_features, in_features]`,
  embeddings are `[vocab, hidden]`), so loading and saving safetensors is a name-for-name copy.
- `RopeConfig` / `rope_cos_sin` / `apply_rope`: rotary embeddings with the `rope_type`s of `transformers`
  (default, linear, dynamic, yarn, llama3), computed on the fly from positions (no buffers in the model).
- `attention`: the dot-product attention kernel (causal, padding, packed segments, sliding window,
  logit soft-capping, grouped-query heads) shared by all families.
- `KVCache` / `begin_prefill` / `begin_decode` / `cached_attention`: generation with a preallocated
  key/value cache (a prefill through `attention`, then decode steps that attend over the cache);
  `matmul_transposed_weight` reads HF-layout weights in place for the few-row matmuls of decode steps on CPU.
- `positions_from_mask`: the default position ids for padded or packed batches.
- `constrain`: an activation sharding hint that is a no-op without a mesh.

Performance notes (XLA on CPU, measured in benchmarks/forward_backward.py): dense layers multiply 2-D
matrices (`[tokens, features]`), since a matmul on 3-D activations was 2x slower forward+backward; attention
puts heads first, folds the query heads that share a key/value head into the rows of one matmul (no repeated
K/V), and splits queries into causal chunks so the masked upper triangle is never computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec


def silu(x: jax.Array) -> jax.Array:
    """`x * sigmoid(x)` with the sigmoid written as `0.5 * tanh(x / 2) + 0.5`: the same function (to float
    rounding), but XLA lowers `tanh` without the division `jax.nn.sigmoid` costs; on CPU the MLP's
    forward+backward ran ~5% faster."""
    return x * (0.5 * jnp.tanh(0.5 * x) + 0.5)


ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function `transformers` calls `name` (`hidden_act` / `hidden_activation`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------------------------
# Parameters in Hugging Face layout
# --------------------------------------------------------------------------------------------------------------


FEW_ROWS = 64


def matmul_transposed_weight(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x [rows, in] @ weight [out, in].T -> [rows, out]`.

    On CPU, a product with at most `FEW_ROWS` rows (a decode step: one token per sequence) is computed
    weight-first, `(weight @ x.T).T`. XLA-CPU's matmul library repacks a right operand contracted on its minor
    dimension at every call, and HF-layout `[out, in]` weights in `x @ weight.T` are exactly that: with 8 rows,
    repacking cost more than multiplying (an MLP matmul took 2x as long as with an `[in, out]` weight). As the
    left operand the weight is read where it lies; an optimisation barrier keeps XLA from turning the product
    back around, and transposing the small `[out, rows]` result is cheap. Training matmuls (thousands of rows)
    and other backends take the plain product.
    """
    if x.shape[0] <= FEW_ROWS and jax.default_backend() == "cpu":
        product = jax.lax.dot_general(weight, x, (((1,), (1,)), ((), ())))  # [out, rows]
        return jax.lax.optimization_barrier(product).T
    return jax.lax.dot_general(x, weight, (((1,), (1,)), ((), ())))


class Linear(nnx.Module):
    """`y = x @ weight.T + bias` with `weight` stored `[out_features, in_features]` as in PyTorch/HF."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.weight = nnx.Param(
            init_std * jax.random.normal(rngs.params(), (out_features, in_features), param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = x.shape[:-1]
        # A 2-D matmul: XLA on CPU runs [tokens, in] x [out, in]^T much faster than the 3-D einsum.
        y = matmul_transposed_weight(x.reshape(-1, self.in_features).astype(self.dtype),
                                     self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*leading, self.out_features)


class Embed(nnx.Module):
    """Token embedding `[vocab, hidden]` (HF `nn.Embedding`); `attend` projects onto it for tied LM heads."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.weight = nnx.Param(init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], input_ids, axis=0).astype(self.dtype)


def project_to_vocab(hidden_states: jax.Array, weight: jax.Array, *, logit_softcap: float | None = None) -> jax.Array:
    """Logits `[..., vocab]` from hidden states `[..., hidden]` and an output projection `[vocab, hidden]`."""
    leading = hidden_states.shape[:-1]
    logits = matmul_transposed_weight(
        hidden_states.reshape(-1, hidden_states.shape[-1]), weight.astype(hidden_states.dtype)
    ).reshape(*leading, weight.shape[0])
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits


# --------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One entry of HF's standardised `config.rope_parameters`, plus what the frequencies depend on."""

    head_dim: int
    max_position_embeddings: int
    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, rope_parameters: Mapping[str, Any], *, head_dim: int, max_position_embeddings: int) -> RopeConfig:
        params = dict(rope_parameters)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}.")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1.0 is not supported by jaxpt's model ports.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in fields and v is not None}
        kwargs.update(rope_type=rope_type, head_dim=head_dim, max_position_embeddings=max_position_embeddings)
        if kwargs.get("rope_theta") is None:
            kwargs["rope_theta"] = 10000.0
        return cls(**kwargs)


def _default_inv_freq(base, dim: int):
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def rope_inv_freq(rope: RopeConfig) -> tuple[np.ndarray, float]:
    """Static inverse frequencies `[head_dim // 2]` and the cos/sin scaling (every type but `dynamic`)."""
    dim, base = rope.head_dim, rope.rope_theta
    inv_freq = _default_inv_freq(base, dim)
    if rope.rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_wavelen = old_context / rope.low_freq_factor
        high_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.rope_type == "yarn":
        original = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / original

        def get_mscale(scale, mscale=1.0):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = rope.attention_factor
        if attention_factor is None:
            if rope.mscale and rope.mscale_all_dim:
                attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

        def correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq.astype(np.float32), float(attention_factor)
    raise AssertionError(rope.rope_type)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[batch, seq, head_dim]` (float32) for integer `positions` `[batch, seq]`."""
    inv_freq, scaling = rope_inv_freq(rope)
    inv_freq = jnp.asarray(inv_freq)
    if rope.rope_type == "dynamic":
        # Dynamic NTK: the base grows with the longest position in the batch beyond max_position_embeddings
        # (HF recomputes it statefully per call; this is the same formula, traced).
        dim = rope.head_dim
        seq_len = jnp.maximum(jnp.max(positions) + 1, rope.max_position_embeddings).astype(jnp.float32)
        base = rope.rope_theta * (
            (rope.factor * seq_len / rope.max_position_embeddings) - (rope.factor - 1)
        ) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, head_dim // 2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[batch, seq, heads, head_dim]` by cos/sin `[batch, seq, head_dim]` (HF's rotate_half)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------------------
# Positions, segments, sharding hints
# --------------------------------------------------------------------------------------------------------------


def segments_from_inputs(
    input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None
) -> jax.Array:
    """One int `[batch, seq]` array that says who attends to whom: equal ids attend (causally) to each other.

    `attention_mask` (1 = token, 0 = padding) becomes segments {1: tokens, 0: padding}, so padding never feeds
    real tokens and no row of the attention matrix is empty. Packed `segment_ids` (0 = padding) are used as
    they are, masked by `attention_mask` when both are given.
    """
    if segment_ids is None:
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.int32)
        return attention_mask.astype(jnp.int32)
    if attention_mask is None:
        return segment_ids.astype(jnp.int32)
    return segment_ids.astype(jnp.int32) * attention_mask.astype(jnp.int32)


def positions_from_mask(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Default position ids `[batch, seq]`.

    - packed `segment_ids`: positions restart at 0 at the start of every segment;
    - `attention_mask`: `cumsum(mask) - 1` (0 on leading padding), which equals `arange` on the tokens of a
      right-padded row and is what HF `generate` uses for left-padded rows;
    - neither: `arange(seq)`.
    """
    batch, seq = shape
    index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        starts = jnp.where(segment_ids != previous, index, 0)
        return index - jax.lax.cummax(starts, axis=1)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return index


BATCH_AXES = ("data", "fsdp")


def constrain(x: jax.Array, *spec) -> jax.Array:
    """`with_sharding_constraint(x, PartitionSpec(*spec))` inside a mesh context; a no-op outside one.

    Spec entries name mesh axes ("data", "fsdp", "tensor") or BATCH_AXES; axes the current mesh does not have
    are dropped, so the same model code runs on any mesh and on none.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    names = set(mesh.axis_names)

    def keep(entry):
        if entry is None:
            return None
        entries = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(e for e in entries if e in names)
        return kept if kept else None

    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(keep(e) for e in spec)))


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------

MASK_VALUE = float(np.finfo(np.float32).min)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    query_chunk_size: int = 128,
) -> jax.Array:
    """Causal dot-product attention over one sequence (training / prefill).

    query `[batch, seq, q_heads, head_dim]`, key/value `[batch, seq, kv_heads, head_dim]`,
    segment_ids `[batch, seq]` (a token attends to earlier tokens with the same id, see
    `segments_from_inputs`). Returns `[batch, seq, q_heads, head_dim]`.

    Scores are float32; `logit_softcap` is Gemma 2's `tanh(s / cap) * cap`; `sliding_window` keeps keys with
    `q_index - k_index < sliding_window` (HF's sliding-window overlay). Queries are split into chunks of
    `query_chunk_size`; each chunk only multiplies against the keys it can see. The backward pass is written
    by hand (flash-attention style): it keeps only each row's log-sum-exp and recomputes the probabilities,
    so memory stays linear in the sequence length apart from one chunk's scores.
    """
    batch, seq, q_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = q_heads // kv_heads
    # Heads first; the `groups` query heads that share a kv head stay together so they fold into rows.
    q = query.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, s, d]
    k = key.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
    v = value.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
    blocks = _attention_blocks(seq, query_chunk_size, sliding_window)
    out = _attention(q, k, v, segment_ids, (float(scale), logit_softcap, sliding_window, blocks))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, q_heads, head_dim)


def _attention_blocks(seq: int, chunk: int, window: int | None) -> tuple[tuple[int, int, int], ...]:
    """(query start, query end, first visible key) for each query chunk."""
    blocks = []
    for q_start in range(0, seq, chunk):
        q_end = min(q_start + chunk, seq)
        k_start = 0 if window is None else max(0, q_start - window + 1)
        blocks.append((q_start, q_end, k_start))
    return tuple(blocks)


def _chunk_scores(q_chunk, k_chunk, segment_ids, block, scale, softcap, window):
    """Masked float32 scores `[b, kvh, g * chunk, keys]` of one query chunk, and the pre-softcap ones."""
    q_start, q_end, k_start = block
    batch, kv_heads, rows, _ = q_chunk.shape
    chunk = q_end - q_start
    raw = jnp.einsum("bhqd,bhkd->bhqk", q_chunk, k_chunk, preferred_element_type=jnp.float32) * scale
    scores = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
    q_index = jnp.arange(q_start, q_end)[:, None]
    k_index = jnp.arange(k_start, q_end)[None, :]
    allowed = k_index <= q_index  # [chunk, keys]
    if window is not None:
        allowed = allowed & (q_index - k_index < window)
    same_segment = segment_ids[:, q_start:q_end, None] == segment_ids[:, None, k_start:q_end]  # [b, chunk, keys]
    allowed = allowed[None] & same_segment
    scores = scores.reshape(batch, kv_heads, rows // chunk, chunk, q_end - k_start)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    return raw, scores.reshape(batch, kv_heads, rows, q_end - k_start)


def _q_chunk(q, block):
    batch, kv_heads, groups, _, head_dim = q.shape
    q_start, q_end, _ = block
    return q[:, :, :, q_start:q_end].reshape(batch, kv_heads, groups * (q_end - q_start), head_dim)


def _attention_forward(q, k, v, segment_ids, options):
    scale, softcap, window, blocks = options
    batch, kv_heads, groups, _, head_dim = q.shape
    outputs, logsumexps = [], []
    for block in blocks:
        q_start, q_end, k_start = block
        _, scores = _chunk_scores(_q_chunk(q, block), k[:, :, k_start:q_end], segment_ids, block, scale, softcap,
                                  window)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        unnormalised = jnp.exp(scores - row_max)
        row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
        # normalise the [rows, head_dim] output rather than the [rows, keys] probabilities: one pass fewer
        out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v[:, :, k_start:q_end],
                         preferred_element_type=jnp.float32)
        out = (out / row_sum).astype(v.dtype)
        chunk = q_end - q_start
        outputs.append(out.reshape(batch, kv_heads, groups, chunk, head_dim))
        logsumexps.append((row_max + jnp.log(row_sum)).reshape(batch, kv_heads, groups, chunk))
    concat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=3)
    return concat(outputs), concat(logsumexps)  # [b, kvh, g, s, d], [b, kvh, g, s]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, options):
    return _attention_forward(q, k, v, segment_ids, options)[0]


def _attention_fwd(q, k, v, segment_ids, options):
    out, logsumexp = _attention_forward(q, k, v, segment_ids, options)
    return out, (q, k, v, segment_ids, out, logsumexp)


def _attention_bwd(options, residuals, d_out):
    scale, softcap, window, blocks = options
    q, k, v, segment_ids, out, logsumexp = residuals
    batch, kv_heads, groups, _, head_dim = q.shape
    # softmax backward: d_scores = p * (d_p - rowsum(d_out * out))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, kvh, g, s]
    d_q_chunks = []
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    for block in blocks:
        q_start, q_end, k_start = block
        chunk = q_end - q_start
        rows = groups * chunk
        q_chunk = _q_chunk(q, block)
        k_chunk, v_chunk = k[:, :, k_start:q_end], v[:, :, k_start:q_end]
        raw, scores = _chunk_scores(q_chunk, k_chunk, segment_ids, block, scale, softcap, window)
        probs = jnp.exp(scores - logsumexp[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, 1))
        d_out_chunk = d_out[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, head_dim)
        d_v = d_v.at[:, :, k_start:q_end].add(
            jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out_chunk, preferred_element_type=jnp.float32)
        )
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_chunk, v_chunk, preferred_element_type=jnp.float32)
        d_scores = probs * (d_probs - delta[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, 1))
        if softcap is not None:
            d_scores = d_scores * (1.0 - jnp.tanh(raw / softcap) ** 2)
        d_scores = (d_scores * scale).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k_chunk, preferred_element_type=jnp.float32)
        d_q_chunks.append(d_q.reshape(batch, kv_heads, groups, chunk, head_dim))
        d_k = d_k.at[:, :, k_start:q_end].add(
            jnp.einsum("bhqk,bhqd->bhkd", d_scores, q_chunk, preferred_element_type=jnp.float32)
        )
    d_q = d_q_chunks[0] if len(d_q_chunks) == 1 else jnp.concatenate(d_q_chunks, axis=3)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------------------------------------------
# Key/value cache for generation
# --------------------------------------------------------------------------------------------------------------


class LayerCache(flax.struct.PyTreeNode):
    """One layer's cached keys `[batch, kv_heads, head_dim, max_length]` and values `[batch, kv_heads, max_length,
    head_dim]`.

    Heads first, and keys stored transposed, so that both products of a decode step are plain `[rows, k] x [k, n]`
    matmuls on the cache as it is: `scores = q @ key`, `out = probs @ value`. On XLA-CPU a matmul whose right
    operand is contracted on its minor dimension repacks that operand on every call; with keys laid out like
    values, the score product was 3x slower than with transposed keys.
    """

    key: jax.Array
    value: jax.Array


class KVCache(flax.struct.PyTreeNode):
    """Every layer's keys and values, preallocated to `max_length` slots, and which slots hold real tokens.

    Slots fill left to right, the same slot in every row: a left-padded prompt `[batch, prompt_len]` takes
    slots `[0, prompt_len)`, then each decode step takes the next one. `mask` marks the slots that hold real
    tokens (not padding); `length` is the number of slots written, i.e. the slot of the next token. The
    position id of a new token is the number of real tokens before it, which is HF's
    `cumsum(attention_mask) - 1` for left-padded prompts. Writing past `max_length` is not detected inside
    `jit` (`dynamic_update_slice` clamps): size the cache `prompt_len + max_new_tokens`.
    """

    layers: tuple[LayerCache, ...]
    mask: jax.Array  # [batch, max_length] bool
    length: jax.Array  # [] int32

    @classmethod
    def create(cls, *, batch_size: int, max_length: int, num_layers: int, num_kv_heads: int, head_dim: int,
               dtype: Any) -> KVCache:
        key_shape = (batch_size, num_kv_heads, head_dim, max_length)
        value_shape = (batch_size, num_kv_heads, max_length, head_dim)
        layers = tuple(LayerCache(key=jnp.zeros(key_shape, dtype), value=jnp.zeros(value_shape, dtype))
                       for _ in range(num_layers))
        return cls(layers=layers, mask=jnp.zeros((batch_size, max_length), bool), length=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


class CacheStep(NamedTuple):
    """Where one call's tokens go in the cache and what they attend to (built by `begin_prefill` /
    `begin_decode`, passed unchanged to every layer).

    `start`: slot of the call's first token. `kv_mask` `[batch, max_length]`: slots holding real tokens, this
    call's included. `segment_ids` `[batch, seq]`: set for a prefill, whose queries attend only to each other
    through the training kernel `attention`; None for decoding, whose queries attend over the cache.
    """

    start: jax.Array | int
    kv_mask: jax.Array
    segment_ids: jax.Array | None = None


def begin_prefill(
    cache: KVCache, input_ids: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, CacheStep, KVCache]:
    """Positions `[batch, seq]`, the `CacheStep` and the cache's new mask/length for running a left-padded
    prompt `input_ids` `[batch, seq]` into slots `[0, seq)` of an empty cache."""
    batch, seq = input_ids.shape
    if seq > cache.max_length:
        raise ValueError(f"The prompt has {seq} tokens but the cache only {cache.max_length} slots: "
                         "create it with max_length >= prompt length + new tokens.")
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), jnp.int32)
    positions = positions_from_mask(attention_mask, None, (batch, seq))
    segments = segments_from_inputs(input_ids, attention_mask, None)
    mask = jnp.zeros_like(cache.mask).at[:, :seq].set(attention_mask.astype(bool))
    mask = constrain(mask, BATCH_AXES, None)
    cache = cache.replace(mask=mask, length=jnp.asarray(seq, jnp.int32))
    return positions, CacheStep(start=0, kv_mask=mask, segment_ids=segments), cache


def begin_decode(cache: KVCache, num_tokens: int = 1) -> tuple[jax.Array, CacheStep, KVCache]:
    """Positions `[batch, num_tokens]`, the `CacheStep` and the cache's new mask/length for appending
    `num_tokens` real tokens per row at slot `cache.length`."""
    batch = cache.mask.shape[0]
    start = cache.length
    count = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)  # real tokens so far = the next position
    positions = count[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((batch, num_tokens), bool), (0, start))
    cache = cache.replace(mask=mask, length=start + num_tokens)
    return positions, CacheStep(start=start, kv_mask=mask, segment_ids=None), cache


def cached_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: LayerCache,
    step: CacheStep,
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, LayerCache]:
    """Attention for generation: write this call's keys/values into the layer's cache, then attend.

    query `[batch, seq, q_heads, head_dim]`, key/value `[batch, seq, kv_heads, head_dim]` (rope applied),
    stored at slots `[step.start, step.start + seq)`. A prefill (`step.segment_ids` set) runs the training
    kernel `attention` over the prompt alone; a decode step (one or a few tokens) attends over the whole
    cache: a key is visible when its slot holds a real token (`step.kv_mask`), is not after the query's slot,
    and, with `sliding_window`, is fewer than `sliding_window` slots before it (HF's window, by index). Returns
    `[batch, seq, q_heads, head_dim]` and the updated cache.
    """
    new_key = key.transpose(0, 2, 3, 1).astype(cache.key.dtype)  # [b, kvh, d, s]
    new_value = value.transpose(0, 2, 1, 3).astype(cache.value.dtype)  # [b, kvh, s, d]
    cache = LayerCache(
        key=constrain(jax.lax.dynamic_update_slice(cache.key, new_key, (0, 0, 0, step.start)),
                      BATCH_AXES, "tensor", None, None),
        value=constrain(jax.lax.dynamic_update_slice(cache.value, new_value, (0, 0, step.start, 0)),
                        BATCH_AXES, "tensor", None, None),
    )
    if step.segment_ids is not None:
        out = attention(query, key, value, segment_ids=step.segment_ids, scale=scale, sliding_window=sliding_window,
                        logit_softcap=logit_softcap)
        return out, cache
    return _attention_over_cache(query, cache, step, scale, sliding_window, logit_softcap), cache


def _attention_over_cache(query, cache, step, scale, sliding_window, logit_softcap):
    batch, seq, q_heads, head_dim = query.shape
    _, kv_heads, _, max_length = cache.key.shape
    groups = q_heads // kv_heads
    # Heads first; the query heads sharing a kv head fold into the rows of one matmul against the cache.
    q = query.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * seq, head_dim).astype(cache.key.dtype)
    scores = jnp.einsum("bhqd,bhdk->bhqk", q, cache.key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    q_index = step.start + jnp.arange(seq, dtype=jnp.int32)[:, None]  # [seq, 1]
    k_index = jnp.arange(max_length, dtype=jnp.int32)[None, :]  # [1, max_length]
    allowed = k_index <= q_index
    if sliding_window is not None:
        allowed = allowed & (q_index - k_index < sliding_window)
    allowed = allowed[None] & step.kv_mask[:, None, :]  # [b, seq, max_length]
    scores = scores.reshape(batch, kv_heads, groups, seq, max_length)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, groups * seq, max_length)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(cache.value.dtype), cache.value)
    out = out.reshape(batch, kv_heads, groups, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, q_heads, head_dim).astype(query.dtype)


# --------------------------------------------------------------------------------------------------------------
# Small helpers the family files share
# --------------------------------------------------------------------------------------------------------------


def call_layer(layer: nnx.Module, *args, remat: bool = False):
    """`layer(*args)`, or with gradient checkpointing (`remat`): its activations are recomputed in the backward
    pass instead of kept, trading about a third more compute for memory linear in the number of layers."""
    if not remat:
        return layer(*args)
    return nnx.remat(lambda module, *inputs: module(*inputs))(layer, *args)

# --------------------------------------------------------------------------------------------------------------


def last_token_index(attention_mask: jax.Array | None, input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Index `[batch]` of the last real token of each row, the token a classifier pools at.

    With an `attention_mask`, the last position whose mask is 1 (works with left and right padding, and when
    the pad token equals the EOS token). Without one, HF's rule: the rightmost token that is not
    `pad_token_id` (or the last position when there is no pad token).
    """
    batch, seq = input_ids.shape
    index = jnp.arange(seq, dtype=jnp.int32)
    if attention_mask is not None:
        is_token = attention_mask.astype(jnp.int32)
    elif pad_token_id is not None:
        is_token = (input_ids != pad_token_id).astype(jnp.int32)
    else:
        return jnp.full((batch,), seq - 1, jnp.int32)
    return jnp.argmax(index * is_token, axis=-1)
