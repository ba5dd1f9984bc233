"""SFT losses against the formulas written out in float64 numpy (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.logprobs import next_token_targets
from jaxpt.losses.sft import sft_loss, sft_loss_from_hidden
from jaxpt.models.layers import project_to_vocab


def reference(logits, targets, mask, loss_type, num_tokens=None):
    """-(1/N) sum m_t w_t log p_t with w_t = 1 (nll) or p_t (dft, as a constant); and d loss / d logits."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp_all = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    probs = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    weight = np.exp(logp) if loss_type == "dft" else np.ones_like(logp)
    n = mask.sum() if num_tokens is None else num_tokens
    loss = -(mask * weight * logp).sum() / n
    one_hot = np.eye(logits.shape[-1])[targets]
    grad = (mask * weight / n)[..., None] * (probs - one_hot)
    entropy = -(probs * logp_all).sum(-1)
    accuracy = (logits.argmax(-1) == targets)
    return loss, grad, (entropy * mask).sum() / mask.sum(), (accuracy * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("num_tokens", [None, 37.0])
def test_sft_loss_matches_formula(loss_type, num_tokens):
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 9, 13).astype(np.float32) * 2
    targets = rng.randint(0, 13, (2, 9))
    mask = (rng.rand(2, 9) > 0.3).astype(np.float32)
    expected_loss, expected_grad, expected_entropy, expected_accuracy = reference(logits, targets, mask, loss_type,
                                                                                   num_tokens)
    (loss, metrics), grad = jax.value_and_grad(
        lambda x: sft_loss(x, targets, mask, loss_type=loss_type, num_tokens=num_tokens), has_aux=True)(logits)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)
    assert float(metrics["entropy"]) == pytest.approx(expected_entropy, rel=1e-5)
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(expected_accuracy)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_loss_from_hidden_equals_logits_version(loss_type):
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 7, 8), jnp.float32)
    weight = jnp.asarray(rng.randn(20, 8), jnp.float32)
    ids = jnp.asarray(rng.randint(0, 20, (2, 7)))
    targets, mask = next_token_targets(ids, jnp.asarray(rng.rand(2, 7) > 0.2, jnp.int32))

    def from_logits(h, w):
        return sft_loss(project_to_vocab(h, w), targets, mask, loss_type=loss_type, num_tokens=11.0)

    def from_hidden(h, w):
        return sft_loss_from_hidden(h, w, targets, mask, loss_type=loss_type, num_tokens=11.0, chunk_size=4)

    (loss, metrics), grads = jax.value_and_grad(from_hidden, argnums=(0, 1), has_aux=True)(hidden, weight)
    (ref_loss, ref_metrics), ref_grads = jax.value_and_grad(from_logits, argnums=(0, 1), has_aux=True)(hidden, weight)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for key in ("entropy", "mean_token_accuracy"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type='bogus'"):
        sft_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), loss_type="bogus")
