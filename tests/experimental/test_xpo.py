"""XPO: the loss against the paper's formula in float64 (value and gradient), micro-batches adding up, and a tiny
model whose sampled score rises over the frozen reference's."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import cli
from jaxpt.experimental import xpo
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama


def pairs(seed=0, count=6):
    rng = np.random.RandomState(seed)
    policy, policy_of_reference = -rng.uniform(1.0, 9.0, count), -rng.uniform(1.0, 9.0, count)
    ref, ref_of_reference = policy + rng.normal(0, 1.0, count), policy_of_reference + rng.normal(0, 1.0, count)
    chosen_is_policy = np.array([True, False, True, True, False, False][:count])
    return policy, policy_of_reference, ref, ref_of_reference, chosen_is_policy


def paper_loss(policy, policy_of_reference, ref, ref_of_reference, chosen_is_policy, *, beta, alpha, loss_type):
    """Algorithm 1 of arXiv:2405.21046 in float64: DPO on (y+, y-) = the preferred and the other one of the
    policy's sample y and the reference's ỹ, plus α log π(ỹ); with its gradient in log π(y) and log π(ỹ)."""
    sign = np.where(chosen_is_policy, 1.0, -1.0)  # y is y+ (z grows with log π(y)) or y- (z falls)
    z = sign * ((policy - ref) - (policy_of_reference - ref_of_reference))
    if loss_type == "sigmoid":
        losses, dloss_dz = np.logaddexp(0.0, -beta * z), -beta / (1.0 + np.exp(beta * z))
    else:
        losses, dloss_dz = (z - 1.0 / (2.0 * beta)) ** 2, 2.0 * (z - 1.0 / (2.0 * beta))
    n = len(z)
    value = np.mean(losses + alpha * policy_of_reference)
    return value, dloss_dz * sign / n, (-dloss_dz * sign + alpha) / n


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradient_match_the_paper_in_float64(loss_type):
    policy, policy_of_reference, ref, ref_of_reference, chosen_is_policy = pairs()
    options = dict(beta=0.2, alpha=0.05, loss_type=loss_type)
    expected, grad_policy, grad_policy_of_reference = paper_loss(policy, policy_of_reference, ref, ref_of_reference,
                                                                 chosen_is_policy, **options)

    def loss(policy, policy_of_reference):
        return xpo.xpo_loss(policy, policy_of_reference, ref, ref_of_reference, chosen_is_policy, **options)

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(policy, jnp.float32), jnp.asarray(policy_of_reference, jnp.float32))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), grad_policy, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(grads[1]), grad_policy_of_reference, rtol=1e-4, atol=1e-8)
    assert float(metrics["loss/xpo"]) == pytest.approx(0.05 * policy_of_reference.mean(), rel=1e-5)
    assert float(metrics["loss/dpo"]) == pytest.approx(expected - 0.05 * policy_of_reference.mean(), rel=1e-5)
    kl = ((policy - ref) + (policy_of_reference - ref_of_reference)) / 2
    assert float(metrics["objective/kl"]) == pytest.approx(kl.mean(), rel=1e-5)
    assert float(metrics["objective/entropy"]) == pytest.approx(-(policy + policy_of_reference).mean() / 2, rel=1e-5)
    chosen = np.where(chosen_is_policy, policy, policy_of_reference)
    assert float(metrics["logps/chosen"]) == pytest.approx(chosen.mean(), rel=1e-5)
    assert (float(metrics["alpha"]), float(metrics["beta"])) == pytest.approx((0.05, 0.2))


def test_micro_batches_add_up_to_the_whole_batch():
    """With the whole step's pair count, two halves' losses and metric sums are the whole batch's."""
    arrays = pairs(seed=1)
    scores = dict(policy_scores=np.arange(6.0), reference_scores=np.full(6, 2.0))
    whole, whole_metrics = xpo.xpo_loss(*arrays, beta=0.3, alpha=0.1, **scores)
    halves = [xpo.xpo_loss(*(a[part] for a in arrays), beta=0.3, alpha=0.1, num_pairs=6, return_counts=True,
                           **{k: v[part] for k, v in scores.items()}) for part in (slice(0, 2), slice(2, 6))]
    assert float(halves[0][0] + halves[1][0]) == pytest.approx(float(whole), rel=1e-6)
    for key, value in whole_metrics.items():
        total, count = (sum(float(h[1][key][i]) for h in halves) for i in (0, 1))
        assert total / count == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    assert float(whole_metrics["objective/scores_margin"]) == pytest.approx(0.5)


def digits_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_training_raises_the_policy_score_over_the_reference(tmp_path):
    """16 prompts per step, one epoch each: alpha=[1e-3, 2e-3] moves to 2e-3 after step 1 (TRL's per-epoch list)."""
    rows = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])
    config = xpo.XPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, max_new_tokens=8,
                           learning_rate=5e-2, max_steps=16, logging_steps=1, mesh_fsdp=1, disable_tqdm=True,
                           save_steps=0, save_final_model=False, beta=0.5, alpha=[1e-3, 2e-3], temperature=1.0)
    result = xpo.train(tiny_llama(VOCAB), TOKENIZER, rows, config, reward_funcs=[digits_reward])
    model_scores = [m["objective/model_scores"] for m in result.metrics]
    ref_scores = [m["objective/ref_scores"] for m in result.metrics]
    assert np.mean(model_scores[-3:]) > np.mean(model_scores[:3]) + 0.1
    assert np.mean(model_scores[-3:]) > np.mean(ref_scores[-3:]) + 0.1  # the reference stays where it started
    assert result.metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert [m["alpha"] for m in result.metrics[:3]] == pytest.approx([1e-3, 2e-3, 2e-3])  # one per epoch
    expected = {"loss", "grad_norm", "loss/dpo", "loss/xpo", "objective/kl", "objective/entropy",
                "objective/model_scores", "objective/ref_scores", "objective/scores_margin", "rewards/chosen",
                "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "val/model_contain_eos_token", "val/ref_contain_eos_token", "alpha", "beta"}
    assert expected <= set(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]))


def test_config_names_and_errors(tmp_path):
    _, _, parsed, reward_args = cli.parse(xpo.XPOConfig, [
        "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--alpha", "1e-4",
        "2e-4", "--reward_funcs", "accuracy_reward"], cli.RewardArguments)  # `jaxpt xpo`'s arguments
    assert parsed.alpha == [1e-4, 2e-4] and reward_args.reward_funcs == ["accuracy_reward"]
    config = xpo.XPOConfig(output_dir=str(tmp_path), alpha=0.01)
    assert (config.alpha, config.beta, config.loss_type) == ([0.01], [0.1], "sigmoid")
    assert xpo.XPOConfig(output_dir=str(tmp_path)).alpha == [1e-5]
    with pytest.raises(ValueError, match="alpha"):
        xpo.XPOConfig(output_dir=str(tmp_path), alpha=[-1.0])
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        xpo.XPOConfig(output_dir=str(tmp_path), loss_type="hinge")
