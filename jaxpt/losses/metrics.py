"""Metrics as `(sum, count)` pairs: how losses hand their metrics to train steps and evaluation loops.

A metric is a mean over something: pairs, tokens, sequences, examples of one kind. A step that accumulates
micro-batches, a mesh that splits the batch, or an evaluation that walks over batches needs the sum and the count,
not the mean: sums and counts add up, and one division at the end gives the mean over the whole batch exactly as
one big batch would. So every loss builds its metrics as `{name: (sum, count)}`; by default it returns their means
(`loss, metrics = dpo_loss(...)`, what a notebook plots), and with `return_counts=True` the pairs themselves.

    pairs = {"entropy": sum_and_count(entropy, mask)}     # in a loss
    totals = total_metrics(scanned_pairs)                 # in a step: sums over the micro-batch axis
    metrics = mean_metrics(totals)                        # once, at the end
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.logprobs import masked_sum

MetricPairs = dict[str, tuple[jax.Array, jax.Array]]


def sum_and_count(values: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(sum of values where mask is set, number of those)` as float32; every entry without a mask. `values`
    broadcasts against `mask` (one value per sequence against a `[batch, seq]` mask counts once per token)."""
    if mask is None:
        return jnp.sum(values).astype(jnp.float32), jnp.asarray(jnp.size(values), jnp.float32)
    return masked_sum(values, mask).astype(jnp.float32), jnp.sum(mask.astype(jnp.float32))


def mean_metrics(pairs: MetricPairs, *, empty: float | None = None) -> dict[str, jax.Array]:
    """`{name: sum / count}`. A count of 0 gives 0 (the sum is 0 too), or `empty` when given (e.g. NaN for "not
    defined": KTO's mean over no desirable example, which TRL does not log)."""
    means = {}
    for name, (total, count) in pairs.items():
        mean = total / jnp.maximum(count, 1.0)
        means[name] = mean if empty is None else jnp.where(count > 0, mean, empty)
    return means


def total_metrics(pairs: MetricPairs) -> MetricPairs:
    """Sums and counts summed over all their axes: the micro-batches a step scanned over (`[accumulation]`)."""
    return {name: (jnp.sum(total), jnp.sum(count)) for name, (total, count) in pairs.items()}


def add_metrics(totals: MetricPairs | None, pairs: MetricPairs) -> MetricPairs:
    """`totals + pairs`, name by name (`totals` None: the first batch): accumulates evaluation batches."""
    if totals is None:
        return dict(pairs)
    return {name: (totals[name][0] + total, totals[name][1] + count) for name, (total, count) in pairs.items()}
