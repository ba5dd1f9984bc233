"""KTO losses against the formulas written out in float64 numpy (values, metrics and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.kto import kto_kl_estimate, kto_loss, kto_metric_means

RNG = np.random.RandomState(0)
POLICY = RNG.randn(7) * 3 - 20
REF = POLICY + RNG.randn(7) * 2
DESIRABLE = np.array([1, 0, 1, 1, 0, 0, 1], bool)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(policy, ref, desirable, kl, loss_type, beta, w_d, w_u, mask=None, n=None):
    """(1/N) sum_i w_i l_i in float64, and d loss / d policy_logps."""
    policy, ref = np.asarray(policy, np.float64), np.asarray(ref, np.float64)
    mask = np.ones_like(policy) if mask is None else mask
    n = mask.sum() if n is None else n
    r = policy - ref
    z0 = max(kl, 0.0)
    if loss_type == "kto":
        s_d, s_u = sigmoid(beta * (r - z0)), sigmoid(beta * (z0 - r))
        losses = np.where(desirable, w_d * (1 - s_d), w_u * (1 - s_u))
        grads = np.where(desirable, -w_d * beta * s_d * (1 - s_d), w_u * beta * s_u * (1 - s_u))
    else:
        s = sigmoid(beta * r)
        losses = np.where(desirable, w_d * (1 - s), w_u * s)
        grads = np.where(desirable, -w_d, w_u) * beta * s * (1 - s)
    return (losses * mask).sum() / n, grads * mask / n


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("beta,w_d,w_u,kl", [(0.1, 1.0, 1.0, 0.7), (0.5, 1.33, 0.8, 2.5), (2.0, 1.0, 3.0, 0.0)])
def test_loss_and_gradient_match_formula(loss_type, beta, w_d, w_u, kl):
    expected, expected_grad = reference(POLICY, REF, DESIRABLE, kl, loss_type, beta, w_d, w_u)

    def loss_of(policy, ref, kl):
        return kto_loss(policy, ref, DESIRABLE, kl, beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
                        loss_type=loss_type)

    (loss, _), (d_policy, d_ref, d_kl) = jax.value_and_grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(POLICY, jnp.float32), jnp.asarray(REF, jnp.float32), jnp.float32(kl))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(d_policy, expected_grad, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(d_ref, -expected_grad, rtol=1e-4, atol=1e-8)
    assert float(d_kl) == 0.0  # the reference point is a constant


def test_kl_is_clamped_at_zero():
    args = (jnp.asarray(POLICY), jnp.asarray(REF), DESIRABLE)
    at_zero = float(kto_loss(*args, 0.0)[0])
    assert float(kto_loss(*args, -3.0)[0]) == at_zero
    assert float(kto_loss(*args, -3.0)[1]["kl"]) == 0.0
    assert float(kto_loss(*args, 3.0)[0]) != at_zero
    # The estimate: mean over the (unmasked) mismatched pairs, clamped, not differentiated.
    policy_kl, ref_kl = jnp.asarray([-5.0, -7.0, -1.0]), jnp.asarray([-6.0, -6.5, -100.0])
    mask = jnp.asarray([1, 1, 0])
    assert float(kto_kl_estimate(policy_kl, ref_kl, example_mask=mask)) == pytest.approx(0.25)  # (1 - 0.5) / 2
    assert float(kto_kl_estimate(ref_kl, policy_kl, example_mask=mask)) == 0.0
    assert float(jax.grad(lambda p: kto_kl_estimate(p, ref_kl))(policy_kl).sum()) == 0.0


def test_mask_and_num_examples_normalise_like_one_big_batch():
    mask = np.array([1, 1, 0, 1, 1, 0, 1], np.float32)
    expected, _ = reference(POLICY, REF, DESIRABLE, 0.4, "kto", 0.1, 1.0, 1.0, mask=mask, n=11.0)
    loss, _ = kto_loss(POLICY, REF, DESIRABLE, 0.4, num_examples=11.0, example_mask=mask)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Two halves normalised by the total add up to the whole.
    halves = [kto_loss(POLICY[s], REF[s], DESIRABLE[s], 0.4, num_examples=7.0)[0] for s in (slice(0, 3), slice(3, 7))]
    assert float(sum(halves)) == pytest.approx(float(kto_loss(POLICY, REF, DESIRABLE, 0.4)[0]), rel=1e-6)


def test_metrics_use_trl_names_and_values():
    beta = 0.3
    _, metrics = kto_loss(POLICY, REF, DESIRABLE, 1.5, beta=beta)
    rewards = beta * (POLICY - REF)
    expected = {
        "rewards/chosen": rewards[DESIRABLE].mean(), "rewards/rejected": rewards[~DESIRABLE].mean(),
        "rewards/margins": rewards[DESIRABLE].mean() - rewards[~DESIRABLE].mean(),
        "logps/chosen": POLICY[DESIRABLE].mean(), "logps/rejected": POLICY[~DESIRABLE].mean(), "kl": 1.5,
        "count/chosen": 4, "count/rejected": 3, "rewards/chosen_sum": rewards[DESIRABLE].sum(),
        "logps/rejected_sum": POLICY[~DESIRABLE].sum(),
    }
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key
    # Summed over micro-batches, the sums give the whole batch's means.
    parts = [kto_loss(POLICY[s], REF[s], DESIRABLE[s], 1.5, beta=beta)[1] for s in (slice(0, 2), slice(2, 7))]
    summed = {k: parts[0][k] + parts[1][k] for k in parts[0] if k.startswith("count/") or k.endswith("_sum")}
    for key, value in kto_metric_means(summed).items():
        assert float(value) == pytest.approx(float(metrics[key]), rel=1e-5), key


def test_batch_without_desirable_examples():
    undesirable = np.zeros(7, bool)
    loss, metrics = kto_loss(POLICY, REF, undesirable, 0.2)
    expected, _ = reference(POLICY, REF, undesirable, 0.2, "kto", 0.1, 1.0, 1.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert np.isnan(metrics["rewards/chosen"]) and np.isnan(metrics["rewards/margins"])
    assert float(metrics["count/chosen"]) == 0.0 and np.isfinite(metrics["rewards/rejected"])


def test_unknown_loss_type_and_missing_kl():
    with pytest.raises(ValueError, match="loss_type='bogus' is not a KTO loss"):
        kto_loss(POLICY, REF, DESIRABLE, 0.0, loss_type="bogus")
    with pytest.raises(ValueError, match="loss_type='kto' needs the KL estimate"):
        kto_loss(POLICY, REF, DESIRABLE, None)
    loss, metrics = kto_loss(POLICY, REF, DESIRABLE, None, loss_type="apo_zero_unpaired")
    assert np.isfinite(loss) and float(metrics["kl"]) == 0.0
