"""Causal dot-product attention for training and prefill, shared by every model family.

- `segments_from_inputs` / `positions_from_mask`: who attends to whom, and the default position ids, for
  padded or packed batches.
- `SharedPrompts` / `shared_prompt_inputs`: rows that hold one prompt followed by several completions of it, so
  that the prompt's tokens go through the layers once for all of them (GRPO/RLOO updates);
- `attention`: causal attention with padding, packed segments, sliding window, logit soft-capping and
  grouped-query heads, by one of the `ATTN_IMPLEMENTATIONS` (a model config's `attn_implementation`):
  - "xla" (the default; transformers' "eager" and "sdpa" mean it too): jaxpt's own kernel, a flash-attention
    style loop over blocks with a hand-written backward pass (`jax.custom_vjp`), every feature, any device;
  - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on GPU (its XLA reference elsewhere);
  - "splash" / "flash": the Pallas TPU kernels of `jax.experimental.pallas.ops.tpu` (interpret mode off TPU).
  A backend that cannot express a feature the call needs runs the "xla" kernel instead and says so once on the
  "jaxpt" logger.

Performance notes (XLA on CPU, measured in benchmarks/forward_backward.py and benchmarks/compile_time.py): the
kernel puts heads first and folds the query heads that share a key/value head into the rows of one matmul (no
repeated K/V); it loops over query blocks and, inside, over the key blocks each can see (`fori_loop`s with
dynamic bounds), so the masked upper triangle is never computed and compile time does not grow with length.
"""

from __future__ import annotations

import logging
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

logger = logging.getLogger("jaxpt")

# --------------------------------------------------------------------------------------------------------------
# Segments and positions
# --------------------------------------------------------------------------------------------------------------


def segments_from_inputs(
    input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None
) -> jax.Array:
    """One int `[batch, seq]` array that says who attends to whom: equal ids attend (causally) to each other.

    `attention_mask` (1 = token, 0 = padding) becomes segments {1: tokens, 0: padding}, so padding never feeds
    real tokens and no row of the attention matrix is empty. Packed `segment_ids` (0 = padding) are used as
    they are, masked by `attention_mask` when both are given. `SharedPrompts` pass through (they carry their
    own padding).
    """
    if isinstance(segment_ids, SharedPrompts):
        if attention_mask is not None:
            raise ValueError("SharedPrompts carry their own padding: pass attention_mask=None with them.")
        return segment_ids
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
    if isinstance(segment_ids, SharedPrompts):
        raise ValueError("SharedPrompts need explicit positions (`shared_prompt_inputs` returns them).")
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


# --------------------------------------------------------------------------------------------------------------
# Shared prompts: one prompt, several completions, the prompt's tokens computed once
# --------------------------------------------------------------------------------------------------------------


class SharedPrompts(flax.struct.PyTreeNode):
    """The `segment_ids` of rows that each hold one prompt followed by `group` completions of it:
    `[prompt (prompt_len), completion 1 (completion_len), ..., completion group (completion_len)]`.

    Every completion attends (causally) to its prompt and to itself, never to its siblings, exactly as it would in
    its own row `[prompt, completion]`: its own row is what `attention` builds for it, with the prompt's keys and
    values repeated. Only the token-wise work (projections, MLPs, norms) of the prompt is shared, which is most of a
    layer's. `prompt_segments` `[rows, prompt_len]` and `completion_segments` `[rows, group * completion_len]`:
    1 for tokens, 0 for padding (prompts left-padded). Build them, the ids and the positions with
    `shared_prompt_inputs`.
    """

    prompt_segments: jax.Array
    completion_segments: jax.Array
    group: int = flax.struct.field(pytree_node=False)


def shared_prompt_inputs(
    prompt_ids: jax.Array, prompt_mask: jax.Array, completion_ids: jax.Array, completion_mask: jax.Array, *,
    group: int,
) -> tuple[jax.Array, jax.Array, SharedPrompts]:
    """A batch of `[prompt, completion]` rows whose prompts come in runs of `group` equal rows (a rollout's
    completions of one prompt, in order), packed so each prompt appears once: `(input_ids, positions, segments)`
    for a model's `hidden_states(input_ids, positions=positions, segment_ids=segments)`, each `[rows / group,
    prompt_len + group * completion_len]`.

    prompt_ids / prompt_mask `[rows, prompt_len]` (left-padded; only the first row of each run is read),
    completion_ids / completion_mask `[rows, completion_len]`. The positions are those of the unpacked rows
    (`positions_from_mask` of `[prompt_mask, completion_mask]`), so hidden states equal theirs.
    """
    rows, prompt_len = prompt_ids.shape
    if rows % group:
        raise ValueError(f"{rows} rows do not split into groups of {group} completions of one prompt.")
    prompts = rows // group
    full_mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
    positions = positions_from_mask(full_mask, None, full_mask.shape)  # [rows, prompt_len + completion_len]

    def first_of_run(prompt_part):  # [rows, prompt_len] -> [rows / group, prompt_len]
        return prompt_part.reshape(prompts, group, prompt_len)[:, 0]

    def pack(prompt_part, completion_part):  # [rows, prompt_len], [rows, completion_len] -> packed rows
        return jnp.concatenate([first_of_run(prompt_part), completion_part.reshape(prompts, -1)], axis=1)

    input_ids = pack(prompt_ids, completion_ids)
    positions = pack(positions[:, :prompt_len], positions[:, prompt_len:])
    segments = SharedPrompts(prompt_segments=first_of_run(prompt_mask).astype(jnp.int32),
                             completion_segments=completion_mask.astype(jnp.int32).reshape(prompts, -1),
                             group=group)
    return input_ids, positions, segments


def shared_prompt_predictions(hidden: jax.Array, *, prompt_len: int, group: int) -> jax.Array:
    """From packed hidden states `[rows / group, prompt_len + group * completion_len, hidden]`
    (`shared_prompt_inputs`), the ones that predict each completion's tokens, `[rows, completion_len, hidden]`:
    the prompt's last position for the first token, then the completion's own positions."""
    prompts, seq, width = hidden.shape
    completion_len = (seq - prompt_len) // group
    last_prompt = jnp.repeat(hidden[:, prompt_len - 1: prompt_len], group, axis=0)  # [rows, 1, hidden]
    completions = hidden[:, prompt_len:].reshape(prompts * group, completion_len, width)
    return jnp.concatenate([last_prompt, completions[:, :-1]], axis=1)


def _shared_prompt_attention(query, key, value, segments: SharedPrompts, **features):
    """`attention` over `SharedPrompts` rows: the prompts attend to themselves; each completion attends over its
    own row `[prompt, completion]` (the prompt's keys and values repeated), whose prompt queries are skipped."""
    prompts, prompt_len = segments.prompt_segments.shape
    group = segments.group
    completion_len = (query.shape[1] - prompt_len) // group
    rows = prompts * group

    def own_rows(x, prompt_part):  # [prompts, prompt_len + group * completion_len, ...] -> [rows, prompt_len + c, ...]
        completions = x[:, prompt_len:].reshape(rows, completion_len, *x.shape[2:])
        return _constrain_heads(jnp.concatenate([prompt_part, completions], axis=1))

    repeat = partial(jnp.repeat, repeats=group, axis=0)
    prompt_out = attention(query[:, :prompt_len], key[:, :prompt_len], value[:, :prompt_len],
                           segment_ids=segments.prompt_segments, **features)
    row_segments = jnp.concatenate([repeat(segments.prompt_segments),
                                    segments.completion_segments.reshape(rows, completion_len)], axis=1)
    skipped_queries = jnp.zeros((rows, prompt_len, *query.shape[2:]), query.dtype)  # outputs not read
    out = attention(own_rows(query, skipped_queries), own_rows(key, repeat(key[:, :prompt_len])),
                    own_rows(value, repeat(value[:, :prompt_len])), segment_ids=row_segments,
                    query_start=prompt_len, **features)
    completion_out = out[:, prompt_len:].reshape(prompts, group * completion_len, *out.shape[2:])
    return jnp.concatenate([prompt_out, completion_out.astype(prompt_out.dtype)], axis=1)


def _constrain_heads(x: jax.Array) -> jax.Array:
    """Queries, keys or values `[rows, seq, heads, head_dim]` laid out as the families lay them out: rows over the
    batch axes, heads over "tensor" (no-op without a mesh). (`layers` imports this module: imported here.)"""
    from jaxpt.models.layers import BATCH_AXES, constrain

    return constrain(x, BATCH_AXES, None, "tensor", None)


# --------------------------------------------------------------------------------------------------------------
# The attention kernel
# --------------------------------------------------------------------------------------------------------------


MASK_VALUE = float(np.finfo(np.float32).min)
# The "xla" kernel's block (queries and keys). On CPU, 64 ran attention's forward+backward fastest (8 x 512 and
# 8 x 2048 tokens, head_dim 64: 2x faster than 128, which was 2x faster than 256); 128 elsewhere, a matrix unit's
# tile (untuned there: accelerators have their own backends).
CPU_BLOCK_SIZE = 64
BLOCK_SIZE = 128
# Short sequences on CPU (at most SHORT_CPU_SEQUENCE tokens, e.g. a GRPO prompt + completion) ran fastest with
# blocks of 32: forward+backward 2.8x faster at 96 tokens (64-blocks pad it to 128 and compute twice the scores
# the causal mask keeps), 1.3x at 192, even at 256; from 384 tokens on, 64 is faster.
SHORT_CPU_BLOCK_SIZE = 32
SHORT_CPU_SEQUENCE = 256


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    implementation: str = "xla",
    block_size: int | None = None,
    query_start: int = 0,
) -> jax.Array:
    """Causal dot-product attention over one sequence (training / prefill).

    query `[batch, seq, q_heads, head_dim]`, key/value `[batch, seq, kv_heads, head_dim]`,
    segment_ids `[batch, seq]` (a token attends to earlier tokens with the same id, see
    `segments_from_inputs`), or `SharedPrompts` (rows of one prompt and several completions of it).
    Returns `[batch, seq, q_heads, head_dim]`.

    `scale` multiplies the scores; `logit_softcap` is Gemma 2's `tanh(s / cap) * cap`; `sliding_window` keeps
    keys with `q_index - k_index < sliding_window` (HF's sliding-window overlay). `implementation` is one of
    `ATTN_IMPLEMENTATIONS` (or an alias, see `resolve_attn_implementation`); `block_size` is the "xla" kernel's
    block (queries and keys; default on CPU `SHORT_CPU_BLOCK_SIZE` up to `SHORT_CPU_SEQUENCE` tokens and
    `CPU_BLOCK_SIZE` beyond, else `BLOCK_SIZE`). `query_start`: the outputs of the queries before it are not
    read (and have no gradient); the "xla" kernel skips its query blocks wholly before it.
    """
    implementation = resolve_attn_implementation(implementation)
    if isinstance(segment_ids, SharedPrompts):
        return _shared_prompt_attention(query, key, value, segment_ids, scale=scale, sliding_window=sliding_window,
                                        logit_softcap=logit_softcap, implementation=implementation,
                                        block_size=block_size)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)  # numpy ids (an attention_mask given as numpy) stay traceable
    features = dict(segment_ids=segment_ids, scale=scale, sliding_window=sliding_window,
                    logit_softcap=logit_softcap)
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, **features)
    if implementation == "splash":
        return _splash_attention(query, key, value, **features)
    if implementation == "flash":
        return _flash_attention(query, key, value, **features)
    return xla_attention(query, key, value, **features, block_size=block_size, query_start=query_start)


def xla_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    block_size: int | None = None,
    query_start: int = 0,
) -> jax.Array:
    """jaxpt's attention kernel ("xla"), `attention`'s arguments. Scores are float32.

    Flash-attention style: queries and keys are cut into blocks of `block_size`; a loop over query blocks runs a
    loop over the key blocks each can see (later blocks, and blocks wholly outside the window, are skipped)
    with an online softmax. The loops are `jax.lax.fori_loop`s (dynamic bounds are fine: autodiff never goes
    through them, the backward pass is written by hand), so the compiled program and its compile time do not
    grow with the sequence length. The backward pass keeps only each row's log-sum-exp and recomputes the
    probabilities block by block, so memory stays linear in the sequence length.
    """
    batch, seq, q_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = q_heads // kv_heads
    if block_size is None:
        if jax.default_backend() != "cpu":
            block_size = BLOCK_SIZE
        else:
            block_size = SHORT_CPU_BLOCK_SIZE if seq <= SHORT_CPU_SEQUENCE else CPU_BLOCK_SIZE
    block = min(block_size, seq)
    num_blocks = -(-seq // block)
    padded = num_blocks * block
    if padded != seq:  # padded keys come after every real query (causally invisible); padded queries are cut off
        pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
        query, key, value = jnp.pad(query, pad), jnp.pad(key, pad), jnp.pad(value, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq)))
    # Blocks first (so a loop step reads one contiguous block), then heads; the `groups` query heads that share
    # a kv head fold into the rows of one matmul: q [blocks, b, kvh, g * block, d], k/v [blocks, b, kvh, block, d].
    q = query.reshape(batch, num_blocks, block, kv_heads, groups, head_dim).transpose(1, 0, 3, 4, 2, 5)
    q = q.reshape(num_blocks, batch, kv_heads, groups * block, head_dim)
    k = key.reshape(batch, num_blocks, block, kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
    v = value.reshape(batch, num_blocks, block, kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
    segments = jnp.asarray(segment_ids, jnp.int32).reshape(batch, num_blocks, block).transpose(1, 0, 2)
    # query blocks wholly before query_start are skipped: their outputs stay 0, their gradient 0
    out = _attention(q, k, v, segments, (float(scale), logit_softcap, sliding_window, query_start // block))
    out = out.reshape(num_blocks, batch, kv_heads, groups, block, head_dim).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(batch, padded, q_heads, head_dim)[:, :seq]


def _key_blocks(q_block, block, window):
    """The key blocks `[first, end)` query block `q_block` can see: none after it, none wholly out of the window."""
    first = 0 if window is None else jnp.maximum(0, (q_block * block - window + 1) // block)
    return first, q_block + 1


def _block_scores(q_block, k_block, segments, i, j, scale, softcap, window):
    """Masked float32 scores `[b, kvh, g * block, block]` of query block i against key block j, and the soft-capped
    ones before masking (None without soft-capping)."""
    batch, kv_heads, rows, _ = q_block.shape
    block = k_block.shape[2]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block, preferred_element_type=jnp.float32) * scale
    capped = None
    if softcap is not None:
        capped = jnp.tanh(scores / softcap)
        scores = capped * softcap
    q_index = i * block + jnp.arange(block)[:, None]
    k_index = j * block + jnp.arange(block)[None, :]
    allowed = k_index <= q_index  # [block, block]
    if window is not None:
        allowed = allowed & (q_index - k_index < window)
    allowed = allowed[None] & (segments[i][:, :, None] == segments[j][:, None, :])  # [b, block, block]
    scores = scores.reshape(batch, kv_heads, rows // block, block, block)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    return scores.reshape(batch, kv_heads, rows, block), capped


def _attention_forward(q, k, v, segments, options):
    scale, softcap, window, first_query_block = options
    num_blocks, batch, kv_heads, rows, head_dim = q.shape
    block = k.shape[3]

    def query_block(i, carry):
        out, logsumexp = carry
        q_block = q[i]

        def key_block(j, state):
            # Online softmax: rescale what the earlier key blocks summed to the new row maximum. A row whose keys
            # so far are all masked sums garbage at max MASK_VALUE; its first real score rescales that by
            # exp(MASK_VALUE - max) = 0, and every row sees a real key (its own diagonal) in its last block.
            row_max, row_sum, acc = state
            scores, _ = _block_scores(q_block, k[j], segments, i, j, scale, softcap, window)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True))
            correction = jnp.exp(row_max - new_max)
            unnormalised = jnp.exp(scores - new_max)
            row_sum = row_sum * correction + jnp.sum(unnormalised, axis=-1, keepdims=True)
            acc = acc * correction + jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v[j],
                                                preferred_element_type=jnp.float32)
            return new_max, row_sum, acc

        first, end = _key_blocks(i, block, window)
        init = (jnp.full((batch, kv_heads, rows, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((batch, kv_heads, rows, 1), jnp.float32),
                jnp.zeros((batch, kv_heads, rows, head_dim), jnp.float32))
        row_max, row_sum, acc = jax.lax.fori_loop(first, end, key_block, init)
        # normalise the [rows, head_dim] output rather than the [rows, keys] probabilities: one pass fewer
        out = out.at[i].set((acc / row_sum).astype(v.dtype))
        logsumexp = logsumexp.at[i].set((row_max + jnp.log(row_sum))[..., 0])
        return out, logsumexp

    init = (jnp.zeros(q.shape, v.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
    # out like q, logsumexp [blocks, b, kvh, rows]
    return jax.lax.fori_loop(first_query_block, num_blocks, query_block, init)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segments, options):
    return _attention_forward(q, k, v, segments, options)[0]


# The names of the kernel's output and row log-sum-exps: what a layer's backward pass needs of its forward pass,
# which `layers.scan_layers` keeps (`jax.checkpoint` policies save named values) instead of running the loops again.
ATTENTION_RESIDUAL_NAMES = ("attention_out", "attention_logsumexp")


def _attention_fwd(q, k, v, segments, options):
    out, logsumexp = _attention_forward(q, k, v, segments, options)
    out = checkpoint_name(out, ATTENTION_RESIDUAL_NAMES[0])
    logsumexp = checkpoint_name(logsumexp, ATTENTION_RESIDUAL_NAMES[1])
    return out, (q, k, v, segments, out, logsumexp)


def _attention_bwd(options, residuals, d_out):
    scale, softcap, window, first_query_block = options
    q, k, v, segments, out, logsumexp = residuals
    block = k.shape[3]
    # softmax backward: d_scores = p * (d_p - rowsum(d_out * out))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    logsumexp = logsumexp[..., None]

    def query_block(i, carry):
        d_q, d_k, d_v = carry
        q_block, d_out_block = q[i], d_out[i]

        def key_block(j, state):
            d_q_block, d_k, d_v = state
            k_block, v_block = k[j], v[j]
            scores, capped = _block_scores(q_block, k_block, segments, i, j, scale, softcap, window)
            probs = jnp.exp(scores - logsumexp[i])
            d_v = d_v.at[j].add(jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out_block,
                                           preferred_element_type=jnp.float32))
            d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v_block, preferred_element_type=jnp.float32)
            d_scores = probs * (d_probs - delta[i])
            if softcap is not None:
                d_scores = d_scores * (1.0 - capped * capped)
            d_scores = (d_scores * scale).astype(q.dtype)
            d_q_block = d_q_block + jnp.einsum("bhqk,bhkd->bhqd", d_scores, k_block,
                                               preferred_element_type=jnp.float32)
            d_k = d_k.at[j].add(jnp.einsum("bhqk,bhqd->bhkd", d_scores, q_block, preferred_element_type=jnp.float32))
            return d_q_block, d_k, d_v

        first, end = _key_blocks(i, block, window)
        d_q_block, d_k, d_v = jax.lax.fori_loop(first, end, key_block,
                                                (jnp.zeros(q_block.shape, jnp.float32), d_k, d_v))
        return d_q.at[i].set(d_q_block.astype(q.dtype)), d_k, d_v

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    d_q, d_k, d_v = jax.lax.fori_loop(first_query_block, q.shape[0], query_block, init)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------------------------------------------
# Backends: `attn_implementation`
# --------------------------------------------------------------------------------------------------------------


ATTN_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "flash")
# transformers' names for its own default kernels mean jaxpt's default kernel
ATTN_IMPLEMENTATION_ALIASES = {"eager": "xla", "sdpa": "xla"}
PALLAS_BLOCK_SIZE = 128

_reported_fallbacks: set[tuple[str, str]] = set()


def resolve_attn_implementation(value: str | None) -> str:
    """An `attn_implementation` value as one of `ATTN_IMPLEMENTATIONS` (None and transformers' "eager" / "sdpa"
    are "xla"); anything else is a ValueError."""
    if value is None:
        return "xla"
    name = ATTN_IMPLEMENTATION_ALIASES.get(value, value)
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={value!r} is not supported; use one of {ATTN_IMPLEMENTATIONS} (or transformers' "
            f"{sorted(ATTN_IMPLEMENTATION_ALIASES)}, which mean 'xla')."
        )
    return name


def attn_implementation_from_hf(hf_config) -> str:
    """The `attn_implementation` a `transformers` config asks for (its `_attn_implementation`, set by
    `attn_implementation=` at construction or `from_pretrained`), resolved; "xla" when it names none."""
    value = getattr(hf_config, "_attn_implementation", None) or getattr(hf_config, "attn_implementation", None)
    return resolve_attn_implementation(value if isinstance(value, str) else None)


def _fall_back(implementation: str, feature: str) -> None:
    """Log, once per backend and feature, that a call runs the "xla" kernel because the backend lacks `feature`."""
    if (implementation, feature) not in _reported_fallbacks:
        _reported_fallbacks.add((implementation, feature))
        logger.info("attn_implementation=%r cannot express %s: those calls run the 'xla' kernel.",
                    implementation, feature)


def _is_one_right_padded_segment(segment_ids: jax.Array) -> jax.Array:
    """True when every row is one segment (id 1) followed by padding (id 0): what sequence lengths express."""
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
    expected = (jnp.arange(segment_ids.shape[1])[None, :] < lengths[:, None]).astype(segment_ids.dtype)
    return jnp.all(segment_ids == expected)


def _cudnn_attention(query, key, value, *, segment_ids, scale, sliding_window, logit_softcap):
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU, XLA's reference implementation elsewhere.

    It takes padding as per-row sequence lengths, so a batch whose rows are each one right-padded sequence runs
    it; a batch with packed segments or left padding runs the "xla" kernel (a `lax.cond`, decided per batch).
    Rows' padded positions are not attended to by either; their own outputs differ (cuDNN gives zeros) and
    nothing reads them. cuDNN lacks logit soft-capping and float32 inputs: those calls run the "xla" kernel.
    """
    features = dict(segment_ids=segment_ids, scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if logit_softcap is not None:
        _fall_back("cudnn", "logit soft-capping")
        return xla_attention(query, key, value, **features)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and query.dtype not in (jnp.bfloat16, jnp.float16):
        _fall_back("cudnn", f"{query.dtype} inputs (it runs bfloat16 / float16)")
        return xla_attention(query, key, value, **features)
    _fall_back("cudnn", "packed segment_ids or left padding (checked per batch)")

    def fused(query, key, value, segment_ids):
        lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn" if on_gpu else None,
        ).astype(query.dtype)

    def kernel(query, key, value, segment_ids):
        return xla_attention(query, key, value, **{**features, "segment_ids": segment_ids})

    return jax.lax.cond(_is_one_right_padded_segment(segment_ids), fused, kernel, query, key, value, segment_ids)


def _pad_for_pallas(query, key, value, segment_ids):
    """Pad the sequence to a multiple of `PALLAS_BLOCK_SIZE` (the Pallas kernels' block): padded keys come after
    every real query (causally invisible), padded queries attend to themselves and are cut off."""
    seq = query.shape[1]
    padded = -(-seq // PALLAS_BLOCK_SIZE) * PALLAS_BLOCK_SIZE
    if padded == seq:
        return query, key, value, segment_ids.astype(jnp.int32)
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - seq)), constant_values=-1)
    return jnp.pad(query, pad), jnp.pad(key, pad), jnp.pad(value, pad), segment_ids


def _splash_attention(query, key, value, *, segment_ids, scale, sliding_window, logit_softcap):
    """Pallas splash attention (TPU; interpret mode elsewhere): causal or sliding-window mask, segment ids,
    soft-capping, one MQA kernel per kv head for grouped-query heads. Every feature: it never falls back."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, seq, q_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = q_heads // kv_heads
    # splash has no scale argument: scale the queries (soft-capping then sees the scaled scores, as ours)
    query, key, value, segments = _pad_for_pallas(query * jnp.asarray(scale, query.dtype), key, value, segment_ids)
    padded = query.shape[1]
    if sliding_window is None:
        head_mask = splash.CausalMask((padded, padded))
    else:
        head_mask = splash.LocalMask((padded, padded), window_size=(sliding_window - 1, 0), offset=0)
    block = PALLAS_BLOCK_SIZE
    block_sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                    block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([head_mask] * groups), block_sizes=block_sizes, attn_logits_soft_cap=logit_softcap,
        interpret=jax.default_backend() != "tpu",
    )
    q = query.reshape(batch, padded, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, s, d]
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [b, kvh, s, d]

    def one_row(q, k, v, segments):  # q [kvh, g, s, d], k/v [kvh, s, d], segments [s]
        ids = splash.SegmentIds(q=segments, kv=segments)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(q, k, v, segments)  # [b, kvh, g, s, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, q_heads, head_dim)
    return out[:, :seq].astype(query.dtype)


def _flash_attention(query, key, value, *, segment_ids, scale, sliding_window, logit_softcap):
    """Pallas flash attention for TPU (`jax.experimental.pallas.ops.tpu.flash_attention`): causal, segment ids,
    scale; kv heads repeated for grouped-query heads. It lacks sliding windows and soft-capping: those calls run
    the "xla" kernel. Off TPU it runs only inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`."""
    features = dict(segment_ids=segment_ids, scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if sliding_window is not None:
        _fall_back("flash", "sliding windows")
        return xla_attention(query, key, value, **features)
    if logit_softcap is not None:
        _fall_back("flash", "logit soft-capping")
        return xla_attention(query, key, value, **features)
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    batch, seq, q_heads, head_dim = query.shape
    groups = q_heads // key.shape[2]
    query, key, value, segments = _pad_for_pallas(query, key, value, segment_ids)
    q = query.transpose(0, 2, 1, 3)  # [b, heads, s, d]
    k = jnp.repeat(key.transpose(0, 2, 1, 3), groups, axis=1)
    v = jnp.repeat(value.transpose(0, 2, 1, 3), groups, axis=1)
    out = pallas_flash.flash_attention(q, k, v, segment_ids=pallas_flash.SegmentIds(q=segments, kv=segments),
                                       causal=True, sm_scale=float(scale))
    return out.transpose(0, 2, 1, 3)[:, :seq].astype(query.dtype)
