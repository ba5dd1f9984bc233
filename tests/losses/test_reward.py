"""Reward loss against the formula written out in float64 numpy (value, metrics, analytic gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.reward import reward_loss


def reference(chosen, rejected, margin, coefficient):
    """L = -mean log σ(c - r - m) + λ mean (c + r)², and dL/dc, dL/dr (σ' = σ(1 - σ), d/dx -log σ(x) = σ(x) - 1)."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    m = np.zeros_like(chosen) if margin is None else np.asarray(margin, np.float64)
    n = len(chosen)
    x = chosen - rejected - m
    sigmoid = 1.0 / (1.0 + np.exp(-x))
    loss = np.mean(np.log1p(np.exp(-x)))
    grad_chosen = (sigmoid - 1.0) / n
    grad_rejected = -grad_chosen
    if coefficient is not None:
        loss += coefficient * np.mean((chosen + rejected) ** 2)
        grad_chosen = grad_chosen + coefficient * 2 * (chosen + rejected) / n
        grad_rejected = grad_rejected + coefficient * 2 * (chosen + rejected) / n
    rewards = np.concatenate([chosen, rejected])
    metrics = {"accuracy": np.mean(chosen > rejected), "margin": np.mean(chosen - rejected),
               "min_reward": rewards.min(), "mean_reward": rewards.mean(), "max_reward": rewards.max()}
    return loss, grad_chosen, grad_rejected, metrics


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coefficient", [None, 0.01, 0.5])
def test_reward_loss_matches_formula(with_margin, coefficient):
    rng = np.random.RandomState(0)
    chosen = (rng.randn(7) * 2).astype(np.float32)
    rejected = (rng.randn(7) * 2).astype(np.float32)
    margin = rng.rand(7).astype(np.float32) if with_margin else None
    expected_loss, expected_chosen, expected_rejected, expected_metrics = reference(chosen, rejected, margin,
                                                                                    coefficient)

    def loss(c, r):
        return reward_loss(c, r, margin=margin, center_rewards_coefficient=coefficient)

    (value, metrics), (grad_chosen, grad_rejected) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(chosen), jnp.asarray(rejected))
    assert float(value) == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(grad_chosen, expected_chosen, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_rejected, expected_rejected, rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(expected_metrics)
    for key, expected in expected_metrics.items():
        assert float(metrics[key]) == pytest.approx(expected, rel=1e-6, abs=1e-7), key


def test_known_values_ties_and_margin():
    # log σ(0) = -log 2: equal rewards give loss log 2, and a tie is not counted as correct (TRL uses c > r).
    loss, metrics = reward_loss(jnp.asarray([1.0, 2.0]), jnp.asarray([1.0, 0.0]))
    assert float(loss) == pytest.approx((np.log(2) + np.log1p(np.exp(-2.0))) / 2, rel=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    assert float(metrics["margin"]) == pytest.approx(1.0)
    assert (float(metrics["min_reward"]), float(metrics["mean_reward"]), float(metrics["max_reward"])) == (0, 1, 2)
    # A margin equal to the reward gap puts the pair back at log 2; the margin metric ignores it.
    loss, metrics = reward_loss(jnp.asarray([3.0]), jnp.asarray([1.0]), margin=jnp.asarray([2.0]))
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)
    assert float(metrics["margin"]) == pytest.approx(2.0)
    # Centering adds λ mean((c + r)²) = 0.1 * 16.
    centered, _ = reward_loss(jnp.asarray([3.0]), jnp.asarray([1.0]), center_rewards_coefficient=0.1)
    plain, _ = reward_loss(jnp.asarray([3.0]), jnp.asarray([1.0]))
    assert float(centered - plain) == pytest.approx(1.6, rel=1e-6)


def test_large_gaps_stay_finite():
    loss, _ = reward_loss(jnp.asarray([-200.0, 200.0]), jnp.asarray([200.0, -200.0]))
    assert float(loss) == pytest.approx(200.0, rel=1e-6)  # (400 + ~0) / 2, no overflow
    grads = jax.grad(lambda c: reward_loss(c, jnp.asarray([200.0, -200.0]))[0])(jnp.asarray([-200.0, 200.0]))
    assert np.isfinite(np.asarray(grads)).all()
