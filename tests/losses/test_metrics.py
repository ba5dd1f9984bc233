"""Metrics as (sum, count) pairs: the public losses' means are the pairs' means, and pairs of micro-batches add up
to the whole batch's means exactly (what the train steps and evaluation loops rely on)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.dpo import completion_token_metrics, dpo_loss
from jaxpt.losses.grpo import grpo_loss
from jaxpt.losses.kto import kto_loss
from jaxpt.losses.metrics import add_metrics, mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.rloo import rloo_loss
from jaxpt.losses.sft import sft_loss

RNG = np.random.RandomState(0)


def test_sum_and_count_mean_and_accumulation():
    values = jnp.asarray([[1.0, 2.0, 30.0], [4.0, 5.0, 60.0]])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    assert [float(x) for x in sum_and_count(values, mask)] == [7.0, 3.0]
    assert [float(x) for x in sum_and_count(values)] == [102.0, 6.0]
    # one value per sequence against a token mask counts once per token
    assert [float(x) for x in sum_and_count(jnp.asarray([[1.0], [10.0]]), mask)] == [12.0, 3.0]
    pairs = {"a": (jnp.asarray([3.0, 4.0]), jnp.asarray([1.0, 2.0])), "b": (jnp.zeros(2), jnp.zeros(2))}
    totals = total_metrics(pairs)
    assert {k: float(v) for k, v in mean_metrics(totals).items()} == {"a": pytest.approx(7.0 / 3.0), "b": 0.0}
    assert np.isnan(mean_metrics(totals, empty=jnp.nan)["b"]) and float(mean_metrics(totals, empty=jnp.nan)["a"]) > 2
    both = add_metrics(add_metrics(None, totals), totals)
    assert [float(x) for x in both["a"]] == [14.0, 6.0]


def assert_halves_add_up(loss, args, kwargs, split_axis_sizes):
    """`loss(*args)`'s mean metrics equal the summed `return_counts` pairs of its two halves."""
    _, whole = loss(*args, **kwargs)
    halves = []
    for part in (slice(0, split_axis_sizes), slice(split_axis_sizes, None)):
        sliced = [a[part] if hasattr(a, "shape") and a.ndim else a for a in args]
        halves.append(loss(*sliced, **kwargs, return_counts=True)[1])
    summed = mean_metrics(add_metrics(halves[0], halves[1]))
    assert set(summed) <= set(whole)
    for key, value in summed.items():
        assert float(value) == pytest.approx(float(whole[key]), rel=1e-5, abs=1e-7), key


def test_sft_loss_pairs():
    logits = jnp.asarray(RNG.randn(4, 5, 7), jnp.float32)
    targets = jnp.asarray(RNG.randint(0, 7, (4, 5)))
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert_halves_add_up(sft_loss, (logits, targets, mask), {}, 1)


def test_dpo_loss_and_token_metrics_pairs():
    chosen, rejected, ref_chosen, ref_rejected = (jnp.asarray(RNG.randn(6) - 5, jnp.float32) for _ in range(4))
    pair_mask = jnp.asarray([1, 1, 0, 1, 1, 1], bool)
    _, means = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3, pair_mask=pair_mask)
    _, pairs = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3, pair_mask=pair_mask,
                        return_counts=True)
    assert float(pairs["rewards/chosen"][1]) == 5.0  # the padding pair counts in no metric
    for key, value in mean_metrics(pairs).items():
        assert float(value) == pytest.approx(float(means[key]), rel=1e-6), key
    assert_halves_add_up(lambda *a, **k: dpo_loss(*a, beta=0.3, **k), (chosen, rejected, ref_chosen, ref_rejected),
                         {}, 2)
    stats = lambda: {name: jnp.asarray(RNG.rand(3, 4), jnp.float32) for name in ("entropy", "mean_logits", "is_top1")}
    chosen_mask, rejected_mask = jnp.asarray(RNG.rand(3, 4) > 0.4), jnp.asarray(RNG.rand(3, 4) > 0.4)
    chosen_stats, rejected_stats = stats(), stats()
    means = completion_token_metrics(chosen_stats, rejected_stats, chosen_mask, rejected_mask)
    halves = [completion_token_metrics({k: v[part] for k, v in chosen_stats.items()},
                                       {k: v[part] for k, v in rejected_stats.items()}, chosen_mask[part],
                                       rejected_mask[part], return_counts=True)
              for part in (slice(0, 1), slice(1, None))]
    for key, value in mean_metrics(add_metrics(*halves)).items():
        assert float(value) == pytest.approx(float(means[key]), rel=1e-6), key


def test_kto_loss_pairs_keep_the_public_sums():
    policy, ref = jnp.asarray(RNG.randn(6) - 5, jnp.float32), jnp.asarray(RNG.randn(6) - 5, jnp.float32)
    desirable = jnp.asarray([1, 0, 1, 1, 0, 0], bool)
    _, public = kto_loss(policy, ref, desirable, 0.2, beta=0.5)
    _, pairs = kto_loss(policy, ref, desirable, 0.2, beta=0.5, return_counts=True)
    assert float(pairs["rewards/chosen"][1]) == float(public["count/chosen"]) == 3.0
    assert float(pairs["logps/rejected"][0]) == pytest.approx(float(public["logps/rejected_sum"]))
    for key, value in mean_metrics(pairs).items():
        assert float(value) == pytest.approx(float(public[key]), rel=1e-6), key


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_and_rloo_loss_pairs(level):
    rng = np.random.RandomState(1)
    logps = jnp.asarray(rng.randn(6, 5) * 0.3 - 2, jnp.float32)
    shift = jnp.asarray([0.0, 0.5, -0.5, 0.5, 0.05, -0.5])[:, None]  # ratios exp(shift): some clip
    old = logps - shift + jnp.asarray(rng.randn(6, 5) * 0.05, jnp.float32)
    ref = logps + jnp.asarray(rng.randn(6, 5) * 0.1, jnp.float32)
    advantages = jnp.asarray([1.0, 1.0, -1.0, -1.0, 1.0, 1.0])
    mask = jnp.asarray(rng.rand(6, 5) > 0.3).at[0].set(False)  # a sequence without tokens counts in no metric
    _, grpo_means = grpo_loss(logps, old, ref, advantages, mask, beta=0.1, importance_sampling_level=level)
    assert grpo_means["clip_ratio/region_mean"] > 0
    assert_halves_add_up(lambda *a, **k: grpo_loss(*a, beta=0.1, importance_sampling_level=level, **k),
                         (logps, old, ref, advantages, mask), {}, 2)
    assert_halves_add_up(rloo_loss, (logps, old, advantages, mask), {}, 2)
