"""Nash-MD: the loss against the paper's policy-gradient estimator in float64 (value and gradient), micro-batches
adding up, the geometric-mixture sampler's distribution, and a tiny model whose sampled score rises."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.experimental import nash_md
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama


def samples(seed=0, count=4, length=5):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, length + 1, count)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    policy = -rng.uniform(0.1, 3.0, (count, length))
    ref = policy + rng.normal(0.0, 0.5, (count, length))
    probabilities = rng.uniform(0.0, 1.0, count)
    return policy, ref, probabilities, mask


def paper_estimator(policy, ref, probabilities, mask, *, beta):
    """Nash-MD-PG (arXiv:2312.00886, section 7) in float64: the surrogate whose gradient in each token's log-prob is
    -(P(y ≻ y') - 1/2 - β log(π(y) / π_ref(y))) / n on the tokens of y."""
    policy_sum, ref_sum = (policy * mask).sum(-1), (ref * mask).sum(-1)
    weight = beta * (policy_sum - ref_sum) - (probabilities - 0.5)
    n = len(policy_sum)
    return np.mean(weight * policy_sum), weight[:, None] * mask / n


def test_loss_and_gradient_match_the_paper_in_float64():
    policy, ref, probabilities, mask = samples()
    expected, expected_grad = paper_estimator(policy, ref, probabilities, mask, beta=0.2)
    loss = lambda logps: nash_md.nash_md_loss(logps, ref, probabilities, mask, beta=0.2)  # noqa: E731
    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(policy, jnp.float32))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-8)
    policy_sum, ref_sum = (policy * mask).sum(-1), (ref * mask).sum(-1)
    assert float(metrics["loss/kl"]) == pytest.approx((policy_sum - ref_sum).mean(), rel=1e-5)
    assert float(metrics["loss/score"]) == pytest.approx(((probabilities - 0.5) * policy_sum).mean(), rel=1e-5)
    assert float(metrics["objective/entropy"]) == pytest.approx(-policy_sum.mean(), rel=1e-5)
    assert float(metrics["rewards/probabilities"]) == pytest.approx(probabilities.mean(), rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(np.mean(policy_sum > ref_sum))
    assert float(metrics["logps/rejected"]) == pytest.approx(ref_sum.mean(), rel=1e-5)


def test_micro_batches_add_up_to_the_whole_batch():
    policy, ref, probabilities, mask = samples(seed=1, count=6)
    scores = dict(policy_scores=np.arange(6.0), mixture_scores=np.ones(6))
    whole, whole_metrics = nash_md.nash_md_loss(policy, ref, probabilities, mask, beta=0.3, **scores)
    halves = [nash_md.nash_md_loss(policy[part], ref[part], probabilities[part], mask[part], beta=0.3,
                                   num_sequences=6, return_counts=True, **{k: v[part] for k, v in scores.items()})
              for part in (slice(0, 2), slice(2, 6))]
    assert float(halves[0][0] + halves[1][0]) == pytest.approx(float(whole), rel=1e-5)
    for key, value in whole_metrics.items():
        total, count = (sum(float(h[1][key][i]) for h in halves) for i in (0, 1))
        assert total / count == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    assert (float(whole_metrics["rewards/chosen"]), float(whole_metrics["rewards/rejected"])) == pytest.approx((2.5, 1))


def test_geometric_mixture_samples_from_the_mixed_distribution():
    """Prefill and a decode step of `GeometricMixture` give (1-m) log π + m log π_ref of the two models' own logits
    (float64 reference), the next-token distribution π^(1-m) π_ref^m up to its normaliser."""
    policy, reference = tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1)
    ids = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)

    @jax.jit  # one compilation for everything (eager dispatch of the layers costs more)
    def run(policy, reference):
        mixture = nash_md.GeometricMixture(policy, reference, 0.3)
        prefill_logits, cache = mixture.prefill(ids[:, :3], mixture.init_cache(2, 4), attention_mask=jnp.ones((2, 3)))
        decode_logits, _ = mixture.decode_step(ids[:, 3], cache)
        return prefill_logits, decode_logits, policy(ids), reference(ids)

    prefill_logits, decode_logits, policy_logits, reference_logits = run(policy, reference)

    def log_softmax64(logits):
        logits = np.asarray(logits, np.float64)
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    expected = 0.7 * log_softmax64(policy_logits) + 0.3 * log_softmax64(reference_logits)  # [2, 4, vocab]
    np.testing.assert_allclose(np.asarray(prefill_logits), expected[:, 2], atol=2e-5)
    np.testing.assert_allclose(np.asarray(decode_logits), expected[:, 3], atol=2e-5)


def digits_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_training_raises_the_policy_score(tmp_path):
    """16 prompts per step, one epoch each: mixture_coef=[0.5, 0.75] moves after step 1 (TRL's per-epoch list).
    The reward weight 8 spreads the preferences P(y ≻ y') = σ(8 (r(y) - r(y'))) for a clear signal in 16 steps."""
    rows = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])
    config = nash_md.NashMDConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, max_new_tokens=8,
                                  learning_rate=5e-2, max_steps=16, logging_steps=1, mesh_fsdp=1, disable_tqdm=True,
                                  save_steps=0, save_final_model=False, beta=0.05, mixture_coef=[0.5, 0.75],
                                  temperature=1.0, reward_weights=[8.0])
    result = nash_md.train(tiny_llama(VOCAB), TOKENIZER, rows, config, reward_funcs=[digits_reward])
    policy_scores = [m["rewards/chosen"] / 8 for m in result.metrics]
    assert np.mean(policy_scores[-3:]) > np.mean(policy_scores[:3]) + 0.15
    probabilities = [m["rewards/probabilities"] for m in result.metrics]  # the policy beats the mixture
    assert np.mean(probabilities[-3:]) > np.mean(probabilities[:3]) + 0.15
    assert result.metrics[0]["loss/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the initial model
    assert [m["mixture_coef"] for m in result.metrics[:3]] == [0.5, 0.75, 0.75]
    expected = {"loss", "grad_norm", "loss/kl", "loss/score", "objective/entropy", "rewards/probabilities",
                "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "val/model_contain_eos_token", "val/ref_contain_eos_token", "beta", "mixture_coef"}
    assert expected <= set(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]))


def test_config_names_and_errors(tmp_path):
    config = nash_md.NashMDConfig(output_dir=str(tmp_path), mixture_coef=0.25)
    assert (config.mixture_coef, config.beta, config.learning_rate) == ([0.25], [0.1], 5e-7)
    assert nash_md.NashMDConfig(output_dir=str(tmp_path)).mixture_coef == [0.5]
    with pytest.raises(ValueError, match="mixture_coef"):
        nash_md.NashMDConfig(output_dir=str(tmp_path), mixture_coef=[0.5, 1.5])
    with pytest.raises(ValueError, match="beta"):
        nash_md.NashMDConfig(output_dir=str(tmp_path), beta=-0.1)
