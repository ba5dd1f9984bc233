"""Nash-MD: the loss against the paper's policy-gradient estimator in float64 (value and gradient), micro-batches
adding up, the geometric-mixture sampler's distribution, and a tiny model whose sampled score rises."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpt import cli
from jaxpt.experimental import nash_md
from jaxpt.sampling import generate
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


class BigramLM(nnx.Module):
    """A causal LM for the sampler whose next-token logits depend on the last token only (`table[token]`): cheap to
    compile, with a next-token distribution known exactly."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def init_cache(self, batch_size, max_length, *, dtype=None):
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, input_ids, cache, *, attention_mask=None):
        return self.table[...][input_ids[:, -1]], cache + input_ids.shape[1]

    def decode_step(self, token_ids, cache):
        return self.table[...][token_ids], cache + 1


def test_geometric_mixture_samples_from_the_mixed_distribution():
    """`GeometricMixture` of two models through `jaxpt.sampling.generate`: its logits after prefill and after a
    decode step are (1-m) log π + m log π_ref (float64 reference), and the sampled tokens follow
    π^(1-m) π_ref^m / Z (empirical frequencies of 4000 samples within 4 standard errors)."""
    rng = np.random.RandomState(0)
    policy_table, reference_table = rng.normal(0, 1.5, (4, 4)), rng.normal(0, 1.5, (4, 4))
    mixture = nash_md.GeometricMixture(BigramLM(policy_table), BigramLM(reference_table), 0.3)

    def log_softmax64(logits):
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    expected = 0.7 * log_softmax64(policy_table) + 0.3 * log_softmax64(reference_table)  # [token, next token]
    prefill_logits, cache = mixture.prefill(jnp.asarray([[0, 2], [1, 3]]), mixture.init_cache(2, 3))
    np.testing.assert_allclose(np.asarray(prefill_logits), expected[[2, 3]], atol=1e-5)
    decode_logits, _ = mixture.decode_step(jnp.asarray([1, 0]), cache)
    np.testing.assert_allclose(np.asarray(decode_logits), expected[[1, 0]], atol=1e-5)

    graphdef, params = nnx.split(mixture, nnx.Param)
    out = generate(graphdef, params, np.full((4000, 1), 2, np.int32), key=jax.random.key(0), max_new_tokens=1)
    frequencies = np.bincount(np.asarray(out.completion_ids[:, 0]), minlength=4) / 4000
    probabilities = np.exp(log_softmax64(expected[2]))
    np.testing.assert_array_less(np.abs(frequencies - probabilities),
                                 4 * np.sqrt(probabilities * (1 - probabilities) / 4000))


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
    _, _, parsed, reward_args = cli.parse(nash_md.NashMDConfig, [
        "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--mixture_coef", "0.5",
        "0.25", "--reward_funcs", "accuracy_reward"], cli.RewardArguments)  # `jaxpt nash_md`'s arguments
    assert parsed.mixture_coef == [0.5, 0.25] and reward_args.reward_funcs == ["accuracy_reward"]
    config = nash_md.NashMDConfig(output_dir=str(tmp_path), mixture_coef=0.25)
    assert (config.mixture_coef, config.beta, config.learning_rate) == ([0.25], [0.1], 5e-7)
    assert nash_md.NashMDConfig(output_dir=str(tmp_path)).mixture_coef == [0.5]
    with pytest.raises(ValueError, match="mixture_coef"):
        nash_md.NashMDConfig(output_dir=str(tmp_path), mixture_coef=[0.5, 1.5])
    with pytest.raises(ValueError, match="beta"):
        nash_md.NashMDConfig(output_dir=str(tmp_path), beta=-0.1)
