"""Online DPO: TRL's `OnlineDPOTrainer.training_step` driven with fixed samples, rewards and log-probs (its loss,
gradient and every metric), and a tiny model whose sampled score rises."""

import json
import tempfile

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import trl.experimental.online_dpo  # a test dependency: parity must fail, never skip, without it

from jaxpt import cli
from jaxpt.experimental import online_dpo
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama, tiny_llama_config

PROMPTS = ["1+2=", "3+4=", "5+0=", "9+9="]
EOS = TOKENIZER.eos_token_id
PAD = TOKENIZER.pad_token_id


def fixed_rollout(seed=0):
    """Two completions per prompt in TRL's order (all first samples, then all second ones): ids with an EOS in
    some rows, their mask, per-token log-probs (0 after the completion, where TRL's unmasked sums would differ)
    and two reward functions' values (a tie in pair 2)."""
    rng = np.random.RandomState(seed)
    rows, length = 2 * len(PROMPTS), 5
    lengths = np.array([5, 3, 4, 2, 5, 1, 4, 3])
    ids = rng.randint(4, VOCAB, size=(rows, length))
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ends_with_eos = np.array([False, True, False, True, False, True, False, True])
    ids[np.arange(rows)[ends_with_eos], lengths[ends_with_eos] - 1] = EOS
    ids = np.where(mask == 1, ids, PAD)
    policy = np.where(mask == 1, -rng.uniform(0.1, 3.0, (rows, length)), 0.0)
    ref = np.where(mask == 1, policy + rng.normal(0.0, 0.4, (rows, length)), 0.0)
    first = np.array([0.5, 0.1, 0.7, 0.9, 0.2, 0.4, 0.7, 0.3])
    second = np.array([1.0, 0.0, 0.2, -0.5, 0.1, 0.6, 0.2, 0.9])
    return ids, mask, policy, ref, first, second, ends_with_eos


def trl_order_to_pairs(values):
    """TRL's rows (first samples of every prompt, then second ones) -> jaxpt's (each prompt's two together)."""
    n = len(PROMPTS)
    return np.stack([values[:n], values[n:]], axis=1).reshape(2 * n, *values.shape[1:])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_gradient_and_metrics_match_trl_training_step(loss_type):
    """OnlineDPOTrainer.training_step with its sampler and forward pass replaced by fixed completions and
    log-probs: jaxpt's scores (weighted rewards, missing-EOS penalty), ranking (ties to the first sample), loss,
    gradient with respect to the policy log-probs and all of TRL's metrics agree."""
    ids, mask, policy, ref, first, second, eos = fixed_rollout()
    reward_a = lambda completions, **kwargs: first.tolist()  # noqa: E731
    reward_b = lambda completions, **kwargs: second.tolist()  # noqa: E731
    args = trl.experimental.online_dpo.OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(), bf16=False, report_to="none", use_cpu=True, gradient_checkpointing=False,
        beta=0.3, loss_type=loss_type, missing_eos_penalty=0.25, reward_weights=[1.0, 2.0], max_new_tokens=5,
        max_length=32)
    trainer = trl.experimental.online_dpo.OnlineDPOTrainer(
        model=transformers.LlamaForCausalLM(tiny_llama_config(VOCAB)), reward_funcs=[reward_a, reward_b], args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]), processing_class=TOKENIZER)
    policy_torch = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    prompt_ids = torch.ones((len(ids), 3), dtype=torch.long)
    trainer._generate = lambda model, prompts, images=None: (prompt_ids, torch.ones_like(prompt_ids),
                                                              torch.tensor(ids), torch.tensor(mask), None)
    trainer._forward = lambda model, *args, **kwargs: (policy_torch if model is trainer.model
                                                      else torch.tensor(ref, dtype=torch.float64))
    trl_loss = float(trainer.training_step(trainer.model, {"prompt": PROMPTS}))
    trl_metrics = {k: v[-1] for k, v in trainer.stats.items()}

    rewards = trl_order_to_pairs(np.stack([first, second], axis=1))
    scores = online_dpo.combined_scores(rewards, trl_order_to_pairs(eos), reward_weights=[1.0, 2.0],
                                        missing_eos_penalty=0.25)
    chosen, rejected = online_dpo.rank_pairs(scores)
    assert chosen[2] == 4  # pair 2's scores tie: the first sample is chosen, as TRL
    sums = lambda logps: (trl_order_to_pairs(logps) * trl_order_to_pairs(mask)).sum(-1)  # noqa: E731

    def loss(policy_tokens):
        policy_sums = (policy_tokens * trl_order_to_pairs(mask)).sum(-1)
        return online_dpo.online_dpo_loss(policy_sums[chosen], policy_sums[rejected], sums(ref)[chosen],
                                          sums(ref)[rejected], beta=0.3, loss_type=loss_type,
                                          chosen_scores=scores[chosen], rejected_scores=scores[rejected])

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(trl_order_to_pairs(policy),
                                                                                jnp.float32))
    assert float(value) == pytest.approx(trl_loss, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), trl_order_to_pairs(policy_torch.grad.numpy()), rtol=1e-4, atol=1e-7)
    metrics["val/contain_eos_token"] = np.mean(eos)  # `rollout` measures it on the sampled completions
    assert set(trl_metrics) == set(metrics)
    for key, expected in trl_metrics.items():
        assert float(metrics[key]) == pytest.approx(expected, rel=1e-5, abs=1e-6), key


def digits_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_training_raises_the_sampled_score_with_trls_metrics(tmp_path):
    """16 prompts, 8 per step: 2 steps an epoch, so beta=[0.5, 0.4] switches after step 2 (TRL's per-epoch list)."""
    rows = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])
    config = online_dpo.OnlineDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_new_tokens=8, learning_rate=3e-2, max_steps=12,
        logging_steps=1, mesh_fsdp=1, disable_tqdm=True, save_steps=0, save_final_model=False, beta=[0.5, 0.4],
        temperature=1.0, log_completions=True)
    result = online_dpo.train(tiny_llama(VOCAB), TOKENIZER, rows, config, reward_funcs=[digits_reward])
    scores = [m["objective/scores"] for m in result.metrics]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1
    assert [m["beta"] for m in result.metrics[:4]] == pytest.approx([0.5, 0.5, 0.4, 0.4])
    assert result.metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the initial model
    assert result.metrics[-1]["objective/kl"] > 0.1
    expected = {"loss", "grad_norm", "learning_rate", "objective/kl", "objective/entropy",
                "objective/non_score_reward", "objective/rlhf_reward", "objective/scores", "objective/scores_margin",
                "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "val/contain_eos_token", "beta", "completions/mean_length"}
    assert expected <= set(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]))
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 12 * 16 and sum(r["chosen"] for r in completions) == 12 * 8


def test_config_names_and_errors(tmp_path):
    _, _, parsed, reward_args = cli.parse(online_dpo.OnlineDPOConfig, [
        "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--beta", "0.2",
        "0.1", "--reward_funcs", "accuracy_reward"], cli.RewardArguments)  # `jaxpt online_dpo`'s arguments
    assert parsed.beta == [0.2, 0.1] and reward_args.reward_funcs == ["accuracy_reward"]
    config = online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), beta=0.2)
    assert config.beta == [0.2] and config.learning_rate == 5e-7 and config.temperature == 0.9
    assert (config.max_new_tokens, config.max_length, config.loss_type) == (64, 512, "sigmoid")
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), beta=[0.1, 0.0])
    with pytest.raises(ValueError, match="max_length=64 must exceed max_new_tokens=64"):
        online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), max_length=64)
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), missing_eos_penalty=-1.0)
    rows = datasets.Dataset.from_list([{"prompt": "ab"}] * 8)
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        online_dpo.train(tiny_llama(VOCAB), TOKENIZER, rows, online_dpo.OnlineDPOConfig(
            output_dir=str(tmp_path), reward_weights=[1.0, 2.0]), reward_funcs=[digits_reward])
