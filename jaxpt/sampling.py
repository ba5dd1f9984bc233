"""Generation with a KV cache: one jitted prefill + decode loop, and the log-probs of what it sampled.

```python
out = jaxpt.sampling.generate(state.graphdef, state.params, prompt_ids, prompt_mask, key=jax.random.key(0),
                              max_new_tokens=256, temperature=0.9, top_p=0.95, eos_token_ids=[eos_id],
                              pad_token_id=pad_id, mesh=mesh)
out.completion_ids, out.completion_logps, out.completion_mask, out.lengths, out.finished
```

How it works: the model's `init_cache` preallocates every layer's keys and values (`kv_cache.LayerCache`) for
`prompt_len + max_new_tokens - 1` tokens; `prefill` runs the left-padded prompt through the training attention
kernel and fills the cache; a `jax.lax.while_loop` then samples a token and runs `decode_step` on it, until every
row has produced an EOS token or `max_new_tokens` tokens. Rows that finished keep being computed (the batch is
one array) but emit `pad_token_id`. The decode loop holds one cache array per layer (`KVCache.split_layers`) and
runs the layers unrolled: nothing per token copies a layer's weights or cache (a layer scan over stacked arrays
copied both, every token); the decode step's compile time grows with depth, the prefill's does not.

- Parameters come as `(graphdef, params)` (`TrainState.graphdef` / `.params`, or `nnx.split(model, nnx.Param)`):
  GRPO/RLOO sample with the training parameters where they are (sharded on the training mesh), no copy.
  With `mesh`, the batch is split over `("data", "fsdp")` like a training batch.
- Prompts are left-padded (`prompt_mask` 0 before the prompt), so every row's next token lands in the same
  cache slot; positions are `cumsum(prompt_mask) - 1` as in `transformers` `generate`.
- `num_return_sequences=n` (transformers' name) samples n completions per prompt, grouped by prompt (rows
  `[p0, p0, ..., p1, ...]`): each prompt is prefilled once and its cache rows repeated, instead of prefilling n
  copies (GRPO/RLOO's groups). The result is the one of passing every prompt repeated n times (same key, same
  samples): the random stream is drawn per output row either way.
- One compilation per (batch size, prompt length, `max_new_tokens`) and per sampling option values (they are
  static). Callers should pad prompts to a few length buckets (e.g. multiples of 64) rather than to each batch's
  own length, or every new length compiles again.
- Sampling follows `transformers`' warpers, in their order: `logits / temperature`, then top-k, then top-p
  (nucleus, the smallest set of top tokens whose probability reaches `top_p`), then min-p (drop tokens whose
  probability is below `min_p` times the top token's). `greedy=True` takes the argmax instead.
- `repetition_penalty` (transformers' `RepetitionPenaltyLogitsProcessor`, CTRL, arXiv:1909.05858) first divides
  the positive logits (multiplies the negative ones) of every token already in the row, prompt or completion, by
  the penalty; unlike transformers, the prompt's left padding does not count as seen. The penalised logits are
  what the row samples from and what its `completion_logps` measure.
- `completion_logps` are `log softmax(logits / temperature)[token]`: the distribution *before* top-k / top-p /
  min-p truncation, which is what TRL's GRPO/RLOO use as the sampling (old) log-probs and what a
  teacher-forced forward pass with the same temperature gives (`jaxpt.losses.logprobs.token_logps`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.kv_cache import KVCache
from jaxpt.models.layers import BATCH_AXES, constrain
from jaxpt.sharding import batch_divisor, batch_sharding, put_global, replicated

logger = logging.getLogger(__name__)

__all__ = ["Completions", "generate"]


class Completions(flax.struct.PyTreeNode):
    """What `generate` returns; every array is `[batch, ...]` except `num_steps`."""

    completion_ids: jax.Array  # [batch, max_new_tokens] int32; pad_token_id after a row's last token
    completion_logps: jax.Array  # [batch, max_new_tokens] float32 log softmax(logits / temperature)[token]; 0 after
    completion_mask: jax.Array  # [batch, max_new_tokens] int32; 1 on generated tokens (the EOS token included)
    lengths: jax.Array  # [batch] int32; generated tokens per row, EOS included
    finished: jax.Array  # [batch] bool; the row ended with an EOS token (False: cut at max_new_tokens)
    num_steps: jax.Array  # [] int32; tokens sampled per row before the loop stopped (= max(lengths))


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static (compile-time) sampling options, normalised: a disabled filter is None."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    greedy: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    repetition_penalty: float | None = None


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray | None = None,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    greedy: bool = False,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    num_return_sequences: int = 1,
    max_new_tokens_per_row: jax.Array | np.ndarray | None = None,
    mesh: jax.sharding.Mesh | None = None,
    repetition_penalty: float | None = None,
) -> Completions:
    """Sample up to `max_new_tokens` tokens after each left-padded prompt, with a KV cache, in one jitted call.

    Args:
      graphdef, params: a causal LM split by `nnx.split(model, nnx.Param)` (or a `TrainState`'s fields).
      prompt_ids: `[batch, prompt_len]` int, left-padded. prompt_mask: `[batch, prompt_len]`, 1 on prompt tokens,
        0 on the leading padding (None: no padding); every row needs its last column set.
      key: PRNG key (`jax.random.key(seed)`); the same key gives the same samples. Unused when `greedy`.
      max_new_tokens: tokens to generate at most per row (>= 1); the loop stops early once every row has
        produced one of `eos_token_ids`. Tokens after a row's EOS are `pad_token_id`.
      temperature: > 0; sampling and `completion_logps` use `softmax(logits / temperature)`.
      top_k: keep the `top_k` most likely tokens (None or 0: off). top_p: nucleus mass in (0, 1] (None or 1: off).
      min_p: in [0, 1]; drop tokens less likely than `min_p` times the most likely one (None or 0: off).
      greedy: take the most likely token (transformers' `do_sample=False`); the filters are then ignored.
      repetition_penalty: > 0 (None or 1: off); penalise the tokens already in the row (prompt and completion so
        far), before the temperature and the filters, as transformers' `repetition_penalty`.
      num_return_sequences: completions per prompt (>= 1); the output has `batch * num_return_sequences` rows,
        each prompt's together. The prompt is prefilled once and its KV cache shared by its completions.
      max_new_tokens_per_row: `[batch * num_return_sequences]` ints in [0, max_new_tokens], each output row's own
        limit (0: the row emits nothing), without a new compilation per limit: a multi-turn rollout continues
        after a tool result with each row's remaining budget (`jaxpt.tools`). None: `max_new_tokens` for all.
      mesh: split the batch over `("data", "fsdp")` of this mesh (params stay where they are). Multi-host
        callers pass global arrays, e.g. from `jaxpt.sharding.shard_batch`.

    Returns:
      `Completions` (completion ids, log-probs, mask, lengths, finished flags, number of decode steps), with
      `batch * num_return_sequences` rows.
    """
    if (isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int | np.integer)
            or num_return_sequences < 1):
        raise ValueError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1.")
    repeats = int(num_return_sequences)
    prompt_ids, prompt_mask = _validate_prompts(prompt_ids, prompt_mask, mesh, repeats)
    options = _options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, greedy=greedy, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                       repetition_penalty=repetition_penalty)
    if key is None:
        raise ValueError("key=None: pass a PRNG key, e.g. key=jax.random.key(0) (it is unused when greedy=True).")
    if max_new_tokens_per_row is not None:
        max_new_tokens_per_row = _validate_row_limits(max_new_tokens_per_row, prompt_ids.shape[0] * repeats,
                                                      options.max_new_tokens)
    # The prompts are split over the mesh's batch axes when they divide (the completions always do); otherwise
    # they are prefilled as repeated rows, like separate prompts.
    share_prefill = repeats > 1 and (mesh is None or prompt_ids.shape[0] % batch_divisor(mesh) == 0)
    if mesh is not None:
        prompt_sharding = batch_sharding(mesh) if share_prefill or repeats == 1 else replicated(mesh)
        prompt_ids = put_global(prompt_ids, prompt_sharding)  # put_global: the mesh may span processes
        prompt_mask = put_global(prompt_mask, prompt_sharding)
        key = put_global(key, replicated(mesh))
        if max_new_tokens_per_row is not None:
            max_new_tokens_per_row = put_global(max_new_tokens_per_row, batch_sharding(mesh))
    signature = (prompt_ids.shape, repeats, options, mesh)
    if signature not in _COMPILED:
        _COMPILED.add(signature)
        logger.info("Compiling generate for %d prompts x %d completions, prompt length %d, max_new_tokens %d.",
                    prompt_ids.shape[0], repeats, prompt_ids.shape[1], options.max_new_tokens)
    return _generate(graphdef, params, prompt_ids, prompt_mask, key, max_new_tokens_per_row, options=options,
                     repeats=repeats, share_prefill=share_prefill, mesh=mesh)


_COMPILED: set = set()  # shapes/options seen, only to log each new compilation once


@partial(jax.jit, static_argnames=("graphdef", "options", "repeats", "share_prefill", "mesh"))
def _generate(graphdef, params, prompt_ids, prompt_mask, key, row_limits, *, options: _Options, repeats: int,
              share_prefill: bool, mesh) -> Completions:
    context = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        return _generate_loop(graphdef, params, prompt_ids, prompt_mask, key, options, repeats, share_prefill,
                              row_limits)


class _LoopState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32: tokens sampled so far (the column the next one goes to)
    token: jax.Array  # [batch] int32: the last sampled token, fed to the next decode step
    cache: KVCache
    completion_ids: jax.Array  # [batch, max_new_tokens]
    completion_logps: jax.Array  # [batch, max_new_tokens]
    lengths: jax.Array  # [batch]
    done: jax.Array  # [batch] bool: the row has produced an EOS token
    seen: jax.Array  # [batch, vocab] bool: tokens in the row so far (repetition_penalty; [batch, 0] when off)


def _generate_loop(graphdef, params, prompt_ids, prompt_mask, key, options: _Options, repeats: int,
                   share_prefill: bool, row_limits: jax.Array | None = None) -> Completions:
    if not share_prefill and repeats > 1:
        prompt_ids = constrain(jnp.repeat(prompt_ids, repeats, axis=0), BATCH_AXES, None)
        prompt_mask = constrain(jnp.repeat(prompt_mask, repeats, axis=0), BATCH_AXES, None)
        repeats = 1
    prompts, prompt_len = prompt_ids.shape
    batch = prompts * repeats
    steps = options.max_new_tokens
    model = nnx.merge(graphdef, params)
    # The last sampled token is never fed back, so the cache needs prompt_len + steps - 1 slots.
    cache = model.init_cache(prompts, prompt_len + steps - 1)
    logits, cache = model.prefill(prompt_ids, cache, attention_mask=prompt_mask)  # [prompts, vocab]
    # One cache array per layer for the decode loop: each token's layers then read their weights and caches in place
    # (kv_cache.KVCache.split_layers); a stacked cache and weights were copied layer by layer at every token.
    # (a model whose cache has no `split_layers`, e.g. a wrapper of other models' caches, decodes on its own cache)
    cache = cache.split_layers() if hasattr(cache, "split_layers") else cache
    if repeats > 1:  # each prompt's completions start from its one prefill: same logits, same cache rows
        logits = constrain(jnp.repeat(logits, repeats, axis=0), BATCH_AXES, None)
        cache = cache.repeat_rows(repeats)
    eos = jnp.asarray(options.eos_token_ids, jnp.int32)
    seen = jnp.zeros((batch, 0), bool)
    if options.repetition_penalty is not None:
        seen = jnp.repeat(tokens_seen(prompt_ids, prompt_mask, logits.shape[-1]), repeats, axis=0)

    def emit(state: _LoopState, logits: jax.Array) -> _LoopState:
        """Sample column `state.step` from `logits` `[batch, vocab]`; finished rows get padding."""
        seen = state.seen
        if options.repetition_penalty is not None:
            logits = repetition_penalty_logits(logits, seen, options.repetition_penalty)
        token, logp = _sample_token(logits, jax.random.fold_in(key, state.step), options)
        if options.repetition_penalty is not None:
            seen = seen.at[jnp.arange(seen.shape[0]), token].set(True)
        alive = ~state.done
        token = jnp.where(alive, token, options.pad_token_id)
        logp = jnp.where(alive, logp, 0.0)
        is_eos = jnp.any(token[:, None] == eos[None, :], axis=-1) if eos.size else jnp.zeros_like(alive)
        lengths = state.lengths + alive.astype(jnp.int32)
        done = state.done | (alive & is_eos)
        if row_limits is not None:  # a row at its own limit stops (it is not `finished`: see below)
            done = done | (lengths >= row_limits)
        return state.replace(
            step=state.step + 1,
            token=token,
            completion_ids=jax.lax.dynamic_update_slice(state.completion_ids, token[:, None], (0, state.step)),
            completion_logps=jax.lax.dynamic_update_slice(state.completion_logps, logp[:, None], (0, state.step)),
            lengths=lengths,
            done=done,
            seen=seen,
        )

    def keep_going(state: _LoopState) -> jax.Array:
        return (state.step < steps) & ~jnp.all(state.done)

    per_layer = getattr(cache, "per_layer", False)  # a jaxpt model's cache, split above
    decode_params = _hoisted_layer_params(params, len(cache.layers)) if per_layer else (lambda: params)

    def decode(state: _LoopState) -> _LoopState:
        logits, cache = nnx.merge(graphdef, decode_params()).decode_step(state.token, state.cache)
        return emit(state.replace(cache=cache), logits)

    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        token=jnp.zeros((batch,), jnp.int32),
        cache=cache,
        completion_ids=constrain(jnp.full((batch, steps), options.pad_token_id, jnp.int32), BATCH_AXES, None),
        completion_logps=constrain(jnp.zeros((batch, steps), jnp.float32), BATCH_AXES, None),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool) if row_limits is None else row_limits <= 0,
        seen=constrain(seen, BATCH_AXES, None),
    )
    state = jax.lax.while_loop(keep_going, decode, emit(state, logits))
    completion_mask = (jnp.arange(steps, dtype=jnp.int32)[None, :] < state.lengths[:, None]).astype(jnp.int32)
    finished = state.done
    if row_limits is not None:  # finished means ended with an EOS token, not stopped at the row's limit
        last = jnp.take_along_axis(state.completion_ids, jnp.maximum(state.lengths - 1, 0)[:, None], axis=-1)[:, 0]
        ended_with_eos = jnp.any(last[:, None] == eos[None, :], axis=-1) if eos.size else jnp.zeros_like(finished)
        finished = (state.lengths > 0) & ended_with_eos
    return Completions(
        completion_ids=state.completion_ids,
        completion_logps=state.completion_logps,
        completion_mask=constrain(completion_mask, BATCH_AXES, None),
        lengths=state.lengths,
        finished=finished,
        num_steps=state.step,
    )


def tokens_seen(token_ids: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
    """`[batch, vocab_size]` bool: True for each token id that occurs in the row where `mask` is set."""
    rows = jnp.arange(token_ids.shape[0])[:, None]
    return jnp.zeros((token_ids.shape[0], vocab_size), bool).at[rows, token_ids].max(mask.astype(bool))


def repetition_penalty_logits(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' `RepetitionPenaltyLogitsProcessor` (CTRL, arXiv:1909.05858) on `logits` `[batch, vocab]`:
    the logit of each `seen` token divided by `penalty` when positive, multiplied by it when negative (so
    penalty > 1 makes a repeat less likely whatever the logit's sign), float32."""
    logits = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _hoisted_layer_params(params: nnx.State, num_layers: int) -> Callable[[], nnx.State]:
    """`params` for the decode loop's body, its stacked decoder parameters (those under a "layers" key) sliced per
    layer once, before the loop.

    The decode step runs its layers unrolled, layer i reading row i of each stacked parameter. On CPU, XLA copies
    such a slice before every matmul and leaves it inside the token loop, so every token copied every layer's
    weights. Here the slices are taken once outside the loop and stacked again inside it, a stack that XLA's
    simplifier folds away (a slice of it is the slice taken outside), so the loop's matmuls read the hoisted
    slices in place. The cost is one extra copy of the decoder weights while generating: on CPU (host memory) only,
    where the copies were measured; accelerators fuse the slice into the matmul and keep their memory.
    """
    if jax.default_backend() != "cpu":
        return lambda: params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)

    def rows(path, leaf):
        stacked = any(getattr(key, "key", None) == "layers" for key in path)
        return [leaf[i] for i in range(num_layers)] if stacked and leaf.shape[:1] == (num_layers,) else leaf

    hoisted = [rows(path, leaf) for path, leaf in leaves]
    return lambda: jax.tree_util.tree_unflatten(treedef, [jnp.stack(leaf) if isinstance(leaf, list) else leaf
                                                          for leaf in hoisted])


def _sample_token(logits: jax.Array, key: jax.Array, options: _Options) -> tuple[jax.Array, jax.Array]:
    """One token per row from `logits` `[batch, vocab]` and its log-prob under `softmax(logits / temperature)`
    (before truncation): `(token [batch] int32, logp [batch] float32)`."""
    logits = logits.astype(jnp.float32)
    scaled = logits / options.temperature if options.temperature != 1.0 else logits
    # One max shared by the argmax and the normaliser: on CPU, passes over [batch, vocab] cost more than the
    # arithmetic (and XLA's (value, index) argmax reduction was 2x slower than max + first index of it).
    top = jnp.max(scaled, axis=-1, keepdims=True)
    log_normaliser = jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))  # logsumexp(scaled) - top
    if options.greedy:
        index = jnp.arange(scaled.shape[-1], dtype=jnp.int32)
        token = jnp.min(jnp.where(scaled == top, index, scaled.shape[-1]), axis=-1)  # first maximum, as argmax
        return token, -log_normaliser  # scaled[token] == top
    token = _sample_truncated(scaled, key, options)
    picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    return token, picked - top[:, 0] - log_normaliser


def _sample_truncated(scaled: jax.Array, key: jax.Array, options: _Options) -> jax.Array:
    """Sample from `softmax(scaled)` after top-k, top-p and min-p (transformers' order)."""
    vocab = scaled.shape[-1]
    if options.top_k is not None and options.top_k < vocab:
        # Candidates by decreasing logit; top-p and min-p then act on these k (renormalised, as transformers).
        values, indices = jax.lax.top_k(scaled, options.top_k)  # [batch, top_k]
        keep = jnp.ones(values.shape, bool)
        if options.top_p is not None:
            probs = jax.nn.softmax(values, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < options.top_p  # the mass before a token is below top_p
        if options.min_p is not None:
            keep = keep & (values >= values[:, :1] + math.log(options.min_p))
        choice = _categorical(key, jnp.where(keep, values, -jnp.inf))
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
    keep = jnp.ones(scaled.shape, bool)
    if options.top_p is not None:
        keep = _nucleus(scaled, options.top_p)
    if options.min_p is not None:
        keep = keep & (scaled >= jnp.max(scaled, axis=-1, keepdims=True) + math.log(options.min_p))
    return _categorical(key, jnp.where(keep, scaled, -jnp.inf))


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Top-p mask `[batch, vocab]`: keep a token when the tokens strictly more likely than it hold less than
    `top_p` of the probability (so the smallest set of most likely tokens reaching `top_p`; tied tokens are kept
    together). Without sorting: XLA-CPU sorts `[batch, vocab]` with a comparator call per comparison (about 8 ms
    for an 8k vocabulary, several decode steps' worth). Instead, bisect for the threshold over the logits' bit
    patterns as order-preserving int32 keys: 32 passes of a masked sum, exact.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(logits, jnp.int32)
    keys = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as int order (negatives reversed)

    def mass_above(threshold):  # [batch]: probability of the tokens whose key is above threshold [batch]
        return jnp.sum(jnp.where(keys > threshold[:, None], probs, 0.0), axis=-1)

    def halve(_, bounds):  # invariant: mass_above(low) >= top_p > mass_above(high)
        low, high = bounds
        middle = (low & high) + ((low ^ high) >> 1)  # floor((low + high) / 2) without int32 overflow
        below_p = mass_above(middle) < top_p
        return jnp.where(below_p, low, middle), jnp.where(below_p, middle, high)

    low = jnp.min(keys, axis=-1) - 1  # everything is above: mass 1
    high = jnp.max(keys, axis=-1)  # nothing is above: mass 0
    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return keys > low[:, None]


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One index per row drawn from `softmax(logits)` `[batch, n]` (-inf: never drawn), int32 `[batch]`.

    Inverts the cumulative distribution with one uniform number per row, in two levels (which block of
    ~sqrt(n) entries, then which entry in it), so no cumulative sum runs over all n entries.
    `jax.random.categorical` draws a Gumbel variate per entry instead, which for an 8k vocabulary on CPU took
    1.4 ms per step, more than the model.
    """
    batch, n = logits.shape
    size = 1 << math.ceil(math.log2(math.sqrt(n))) if n > 1 else 1  # entries per block
    blocks = -(-n // size)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised; 0 where -inf
    probs = jnp.pad(probs, ((0, 0), (0, blocks * size - n))).reshape(batch, blocks, size)
    block_mass = jnp.sum(probs, axis=-1)  # [batch, blocks]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = (1.0 - jax.random.uniform(key, (batch,))) * block_cdf[:, -1]  # in (0, total mass]
    block = _first_reaching(block_cdf, target, block_mass)
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [batch, size]
    mass_before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=-1)[:, 0]
    within = _first_reaching(jnp.cumsum(inner, axis=-1), target - mass_before, inner)
    return block * size + within


def _first_reaching(cdf: jax.Array, target: jax.Array, mass: jax.Array) -> jax.Array:
    """Per row, the first index whose `cdf` reaches `target`, kept (against rounding) between the first and the
    last index of positive `mass`, so an entry of zero probability is never chosen."""
    index = jnp.arange(cdf.shape[-1], dtype=jnp.int32)
    count = jnp.sum((cdf < target[:, None]).astype(jnp.int32), axis=-1)
    positive = mass > 0
    first = jnp.min(jnp.where(positive, index, cdf.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(positive, index, 0), axis=-1)
    return jnp.clip(count, first, last)


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _options(*, max_new_tokens, temperature, top_k, top_p, min_p, greedy, eos_token_ids, pad_token_id,
             repetition_penalty=None) -> _Options:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (use greedy=True for argmax "
                         "decoding).")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 0 (0 or None: no top-k filter).")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1] (1 or None: no nucleus filter).")
    if min_p is not None and not (isinstance(min_p, int | float) and 0 <= min_p <= 1):
        raise ValueError(f"min_p={min_p!r} must be None or in [0, 1] (0 or None: no min-p filter).")
    if repetition_penalty is not None and not (isinstance(repetition_penalty, int | float)
                                               and math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be None or a finite number > 0 (1 or None: "
                         "off; > 1 discourages repeats).")
    if eos_token_ids is None:
        eos = ()
    elif isinstance(eos_token_ids, int | np.integer):
        eos = (int(eos_token_ids),)
    else:
        eos = tuple(int(i) for i in eos_token_ids)
    if any(i < 0 for i in eos):
        raise ValueError(f"eos_token_ids={eos_token_ids!r} must be token ids >= 0.")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int | np.integer) or pad_token_id < 0:
        raise ValueError(f"pad_token_id={pad_token_id!r} must be a token id >= 0.")
    return _Options(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k) if top_k else None,
        top_p=float(top_p) if top_p is not None and top_p < 1 else None,
        min_p=float(min_p) if min_p else None,
        greedy=bool(greedy),
        eos_token_ids=eos,
        pad_token_id=int(pad_token_id),
        repetition_penalty=float(repetition_penalty) if repetition_penalty not in (None, 1, 1.0) else None,
    )


def _validate_row_limits(limits: Any, rows: int, max_new_tokens: int) -> jax.Array:
    if tuple(getattr(limits, "shape", ())) != (rows,):
        raise ValueError(f"max_new_tokens_per_row has shape {tuple(getattr(limits, 'shape', ()))}: it must be "
                         f"[{rows}] (one limit per output row, batch x num_return_sequences).")
    if not isinstance(limits, jax.core.Tracer) and getattr(limits, "is_fully_addressable", True):
        values = np.asarray(limits)
        if values.min(initial=0) < 0 or values.max(initial=0) > max_new_tokens:
            raise ValueError(f"max_new_tokens_per_row holds {values.min()}..{values.max()}: every limit must be in "
                             f"[0, max_new_tokens={max_new_tokens}].")
    return jnp.asarray(limits, jnp.int32)


def _validate_prompts(prompt_ids: Any, prompt_mask: Any, mesh, repeats: int = 1) -> tuple[jax.Array, jax.Array]:
    if getattr(prompt_ids, "ndim", None) != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {getattr(prompt_ids, 'shape', None)}.")
    if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}.")
    if prompt_mask is None:
        prompt_mask = np.ones(prompt_ids.shape, np.int32)
    if tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, prompt_ids {tuple(prompt_ids.shape)}: "
                         "they must match.")
    if mesh is not None and prompt_ids.shape[0] * repeats % batch_divisor(mesh):
        raise ValueError(f"The batch has {prompt_ids.shape[0] * repeats} rows ({prompt_ids.shape[0]} prompts x "
                         f"num_return_sequences={repeats}), which the mesh's data*fsdp={batch_divisor(mesh)} does "
                         "not divide: make it a multiple of it.")
    # Left padding is what lets every row write the same cache slot; check it when the mask is on hand.
    if not isinstance(prompt_mask, jax.core.Tracer) and getattr(prompt_mask, "is_fully_addressable", True):
        last = np.asarray(prompt_mask)[:, -1]
        if not np.all(last == 1):
            rows = np.flatnonzero(last != 1)[:5].tolist()
            raise ValueError(f"prompt_mask rows {rows} end in padding: prompts must be left-padded (padding "
                             "before the prompt), e.g. tokenizer.padding_side = 'left'.")
    return jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
