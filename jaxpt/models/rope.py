"""Rotary position embeddings with the `rope_type`s of `transformers` (default, linear, dynamic, yarn, llama3).

`RopeConfig` is one entry of HF's `config.rope_parameters`; `rope_inv_freq` gives its inverse frequencies,
`rope_cos_sin` the cos/sin of given positions (computed on the fly, so the model holds no buffers), and
`apply_rope` rotates queries and keys (HF's `rotate_half` convention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
