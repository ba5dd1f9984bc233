"""The sampler/trainer mismatch of online methods: its metrics and the importance-sampling correction.

GRPO and RLOO sample completions with a decode loop (KV cache, one token at a time) and train on the log-probs of
a teacher-forced forward pass. With the same parameters the two are the same distribution, but not the same
arithmetic: in float32 they agree to ~1e-6, in bfloat16 they differ by up to a few tenths of a nat per token. The
update therefore takes its old (behaviour) log-probs from the training forward pass, never from the sampler, and
measures the gap every step (TRL's metric names):

    d_t = |trainer_logp_t - sampler_logp_t|        sampling/sampling_logp_difference/mean, /max (completion tokens)
    w   = exp(trainer_logp - sampler_logp)         sampling/importance_sampling_ratio/min, /mean, /max

`trainer_logp` are the old log-probs the ratio divides by (the pre-update forward pass, or the current detached
log-probs when the update is on-policy). The optional correction (TRL's `vllm_importance_sampling_correction` for
its vLLM sampler; jaxpt's `sampler_importance_sampling_*` fields) multiplies the per-token policy loss by `w`,
per token (`token_*`) or per sequence with `w = exp(sum_t (trainer_logp_t - sampler_logp_t))` (`sequence_*`),
either clipped to `[clip_min, clip_max]` (`*_truncate`) or set to 0 outside it (`*_mask`). With the correction on,
the ratio metrics describe the weights applied (over completion tokens, or over sequences for `sequence_*`);
without it, the raw per-token ratios.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpt.losses.metrics import MetricPairs, sum_and_count

SAMPLER_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_importance_weights(
    trainer_logps: jax.Array,
    sampler_logps: jax.Array,
    completion_mask: jax.Array,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> jax.Array:
    """Importance weights correcting for sampling with the sampler's distribution instead of the trainer's:
    `[batch, length]` for the `token_*` modes, `[batch, 1]` for the `sequence_*` ones (see the module
    docstring). Inputs are per-token log-probs `[batch, length]`; no gradient flows through the weights."""
    if mode not in SAMPLER_IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"sampler_importance_sampling_mode={mode!r}; use one of {SAMPLER_IMPORTANCE_SAMPLING_MODES}.")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"sampler_importance_sampling_mode={mode!r} needs sampler_importance_sampling_clip_min or "
                         "_clip_max (both are None).")
    mask = completion_mask.astype(jnp.float32)
    log_ratio = jax.lax.stop_gradient(trainer_logps - sampler_logps) * mask
    if mode.startswith("sequence"):
        log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True)
    weights = jnp.exp(log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("_truncate"):
        return jnp.clip(weights, low, high)
    return jnp.where((weights < low) | (weights > high), 0.0, weights)


def sampler_mismatch_metrics(
    trainer_logps: jax.Array,
    sampler_logps: jax.Array,
    completion_mask: jax.Array,
    *,
    importance_weights: jax.Array | None = None,
) -> tuple[MetricPairs, dict[str, jax.Array]]:
    """`(pairs, extremes)`: the means as `(sum, count)` pairs (`sampling/sampling_logp_difference/mean`,
    `sampling/importance_sampling_ratio/mean`) and the maxima / minima (`.../max`, `.../min`) of one micro-batch,
    which `combine_extremes` reduces over micro-batches. `importance_weights`: the correction applied (from
    `sampler_importance_weights`); None: the raw per-token ratios are reported."""
    mask = completion_mask.astype(bool)
    log_ratio = jax.lax.stop_gradient(trainer_logps - sampler_logps)
    difference = jnp.abs(log_ratio)
    if importance_weights is None:
        ratios, ratio_mask = jnp.exp(log_ratio), mask
    elif importance_weights.shape[-1] == 1:  # one weight per sequence: every sequence counts once, as TRL
        ratios, ratio_mask = importance_weights, jnp.ones(importance_weights.shape, bool)
    else:
        ratios, ratio_mask = importance_weights, mask
    pairs = {"sampling/sampling_logp_difference/mean": sum_and_count(difference, mask),
             "sampling/importance_sampling_ratio/mean": sum_and_count(ratios, ratio_mask)}
    extremes = {"sampling/sampling_logp_difference/max": jnp.max(jnp.where(mask, difference, -jnp.inf)),
                "sampling/importance_sampling_ratio/min": jnp.min(jnp.where(ratio_mask, ratios, jnp.inf)),
                "sampling/importance_sampling_ratio/max": jnp.max(jnp.where(ratio_mask, ratios, -jnp.inf))}
    return pairs, extremes


def combine_extremes(extremes: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reduce `sampler_mismatch_metrics` extremes over any leading axes (the micro-batches a step scanned):
    max for `.../max`, min for `.../min`; 0 when no token was counted (as TRL logs an empty selection)."""
    combined = {}
    for name, values in extremes.items():
        value = jnp.max(values) if name.endswith("/max") else jnp.min(values)
        combined[name] = jnp.where(jnp.isfinite(value), value, 0.0).astype(jnp.float32)
    return combined
