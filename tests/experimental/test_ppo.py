"""PPO (TRL's old PPOTrainer, not in TRL 1.16): the per-token rewards, GAE, whitening and the clipped losses against
their formulas recomputed in float64 numpy, the step's accumulation, and `jaxpt ppo` on a tiny task whose score
rises in a few updates."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpt.models
from jaxpt import cli
from jaxpt.experimental import ppo
from jaxpt.sharding import make_mesh, path_name, shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama


def digit_reward(completions, **kwargs):
    """The share of a completion's characters that are digits (dense: a random policy scores about 0.1)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def np_whiten(values, mask, shift_mean=True):
    mean = values[mask].mean()
    variance = values[mask].var(ddof=1)
    whitened = (values - mean) / np.sqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def np_gae(rewards, values, gamma, lam):
    """TRL's backward loop over the positions."""
    advantages = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


RNG = np.random.default_rng(0)
T = 7
LENGTHS = np.array([3, 7, 1, 5])  # the second fills every position (no room after its last token)
LOGPROBS, REF_LOGPROBS = -RNG.uniform(0.1, 3, (4, T)), -RNG.uniform(0.1, 3, (4, T))
SCORES = RNG.normal(size=4)
POSITIONS = np.arange(T)[None]
RESPONSE_MASK, VALUE_MASK = POSITIONS < LENGTHS[:, None], POSITIONS < LENGTHS[:, None] + 1


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_rewards_against_float64(estimator):
    rewards, kl, non_score = ppo.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, LENGTHS, kl_coef=0.3,
                                                      kl_estimator=estimator)
    log_ratio = (REF_LOGPROBS - LOGPROBS) * RESPONSE_MASK
    expected_kl = -log_ratio if estimator == "k1" else (np.exp(log_ratio) - 1) - log_ratio
    expected = -0.3 * expected_kl
    for row, length in enumerate(LENGTHS):
        expected[row, length if length < T else T - 1] += SCORES[row]  # the score after the last token
    np.testing.assert_allclose(np.asarray(kl), expected_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(non_score), -0.3 * expected_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), expected, rtol=1e-5, atol=1e-6)


def test_gae_and_whitening_against_float64():
    rewards, values = RNG.normal(size=(4, T)), RNG.normal(size=(4, T)) * VALUE_MASK
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        advantages, returns = ppo.gae_advantages(np.float32(rewards), np.float32(values), gamma=gamma, lam=lam)
        expected_advantages, expected_returns = np_gae(rewards, values, gamma, lam)
        np.testing.assert_allclose(np.asarray(advantages), expected_advantages, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(returns), expected_returns, rtol=1e-5, atol=1e-5)
    for shift_mean in (True, False):
        whitened = ppo.masked_whiten(np.float32(rewards), RESPONSE_MASK, shift_mean=shift_mean)
        np.testing.assert_allclose(np.asarray(whitened)[RESPONSE_MASK],
                                   np_whiten(rewards, RESPONSE_MASK, shift_mean)[RESPONSE_MASK], rtol=1e-5, atol=1e-5)


def test_loss_and_metrics_against_float64():
    new_logprobs = LOGPROBS + RNG.normal(scale=0.3, size=(4, T))
    values, old_values = RNG.normal(size=(4, T)), RNG.normal(size=(4, T)) * VALUE_MASK
    advantages, returns = RNG.normal(size=(4, T)) * RESPONSE_MASK, RNG.normal(size=(4, T))
    f32 = np.float32
    loss, metrics = ppo.ppo_loss(f32(new_logprobs), f32(values), f32(LOGPROBS), f32(old_values), f32(advantages),
                                 f32(returns), RESPONSE_MASK, VALUE_MASK, cliprange=0.2, cliprange_value=0.25,
                                 vf_coef=0.3)
    ratio = np.exp(new_logprobs - LOGPROBS)
    pg1, pg2 = -advantages * ratio, -advantages * np.clip(ratio, 0.8, 1.2)
    pg_loss = np.maximum(pg1, pg2)[RESPONSE_MASK].mean()
    predicted = values * VALUE_MASK
    vf1 = (predicted - returns) ** 2
    vf2 = (np.clip(predicted, old_values - 0.25, old_values + 0.25) - returns) ** 2
    vf_loss = 0.5 * np.maximum(vf1, vf2)[VALUE_MASK].mean()
    assert float(loss) == pytest.approx(pg_loss + 0.3 * vf_loss, rel=1e-5)
    expected = {"pg_loss": pg_loss, "vf_loss": vf_loss, "pg_clipfrac": (pg2 > pg1)[RESPONSE_MASK].mean(),
                "vf_clipfrac": (vf2 > vf1)[VALUE_MASK].mean(), "ratio": ratio[RESPONSE_MASK].mean(),
                "approxkl": 0.5 * ((new_logprobs - LOGPROBS) ** 2)[RESPONSE_MASK].mean()}
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # normalised by a whole mini-batch's tokens, halves add up to the whole (gradient accumulation)
    halves = [ppo.ppo_loss(*(f32(x[rows]) for x in (new_logprobs, values, LOGPROBS, old_values, advantages,
                                                    returns)), RESPONSE_MASK[rows], VALUE_MASK[rows], cliprange=0.2,
                           cliprange_value=0.25, vf_coef=0.3, num_response_tokens=RESPONSE_MASK.sum(),
                           num_value_tokens=VALUE_MASK.sum())[0] for rows in (slice(0, 1), slice(1, 4))]
    assert float(sum(halves)) == pytest.approx(float(loss), rel=1e-5)


def test_config_defaults_and_validation(tmp_path):
    defaults = ppo.PPOConfig()
    assert (defaults.learning_rate, defaults.num_ppo_epochs, defaults.num_mini_batches, defaults.kl_coef,
            defaults.kl_estimator, defaults.cliprange, defaults.vf_coef, defaults.cliprange_value, defaults.gamma,
            defaults.lam, defaults.whiten_rewards, defaults.response_length, defaults.temperature,
            defaults.missing_eos_penalty) == (3e-6, 4, 1, 0.05, "k1", 0.2, 0.1, 0.2, 1.0, 0.95, False, 53, 0.7, None)
    with pytest.raises(ValueError, match="kl_estimator='k2'; use 'k1' or 'k3'"):
        ppo.PPOConfig(output_dir=str(tmp_path), kl_estimator="k2")
    with pytest.raises(ValueError, match="lam=1.5 must be in \\[0, 1\\]"):
        ppo.PPOConfig(output_dir=str(tmp_path), lam=1.5)
    with pytest.raises(ValueError, match="value model must be a sequence classifier with one output"):
        ppo.check_value_model(tiny_llama(VOCAB))


def test_accumulation_on_a_mesh_matches_one_big_batch(tmp_path):
    """Two micro-batches on a 2-device data-parallel mesh take the step of one big batch on one device."""
    config = ppo.PPOConfig(output_dir=str(tmp_path), logits_chunk_size=4)
    n, prompt_length = 4, 3
    batch = {"prompt_ids": RNG.integers(3, VOCAB, (n, prompt_length)).astype(np.int32),
             "prompt_mask": np.ones((n, prompt_length), np.int32),
             "completion_ids": RNG.integers(3, VOCAB, (n, T)).astype(np.int32),
             "attention_mask": RESPONSE_MASK.astype(np.int32), "logprobs": np.float32(LOGPROBS),
             "values": np.float32(RNG.normal(size=(n, T)) * VALUE_MASK),
             "advantages": np.float32(RNG.normal(size=(n, T)) * RESPONSE_MASK),
             "returns": np.float32(RNG.normal(size=(n, T))), "response_mask": RESPONSE_MASK.astype(np.int32),
             "value_mask": VALUE_MASK.astype(np.int32)}
    outputs = []
    for accumulation, mesh in ((1, None), (2, make_mesh(data=2, fsdp=1, devices=jax.devices()[:2]))):
        joint = ppo.PolicyAndValue(tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1, num_labels=1))
        state = TrainState.create(joint, optax.sgd(0.1), mesh=mesh)
        step = ppo.make_train_step(config, mesh=mesh, state_sharding=state.shardings(mesh))
        shaped = {k: v.reshape(accumulation, n // accumulation, *v.shape[1:]) for k, v in batch.items()}
        state, metrics = step(state, shard_batch(shaped, mesh, batch_axis=1))
        outputs.append((jax.device_get(metrics), state.params))
    for name in ("loss", "pg_loss", "vf_loss", "ratio", "entropy", "grad_norm"):
        assert float(outputs[0][0][name]) == pytest.approx(float(outputs[1][0][name]), rel=1e-4, abs=1e-6), name
    assert float(outputs[0][0]["ratio"]) != pytest.approx(1.0)  # the old log-probs are not the model's
    difference = jax.tree.map(lambda a, b: float(abs(a - b).max()), outputs[0][1], outputs[1][1])
    assert max(jax.tree.leaves(difference)) < 1e-5


def test_command_score_rises(tmp_path):
    """`jaxpt ppo` end to end (value model from the policy checkpoint with a new head): in a few updates the policy
    learns to write digits (and scores so on the eval prompts), every metric is logged under TRL's name, and policy
    and value model are exported."""
    model_dir = tmp_path / "model"
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, seed=0), model_dir)
    TOKENIZER.save_pretrained(model_dir)
    data_dir = tmp_path / "prompts"
    data_dir.mkdir()
    lines = "".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(4) for b in range(4))
    (data_dir / "train.jsonl").write_text(lines)
    (data_dir / "test.jsonl").write_text(lines)
    out = tmp_path / "out"
    argv = ["ppo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir",
            str(out), "--reward_funcs", "tests.experimental.test_ppo.digit_reward", "--max_steps", "8",
            "--per_device_train_batch_size", "8", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
            "--response_length", "8", "--temperature", "1.0", "--learning_rate", "3e-2", "--kl_coef", "0.01",
            "--mesh_fsdp", "1", "--logging_steps", "1", "--save_steps", "0", "--disable_tqdm", "true",
            "--missing_eos_penalty", "0.1", "--seed", "0",
            "--eval_strategy", "steps", "--eval_steps", "8", "--per_device_eval_batch_size", "16"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "objective/scores" in r]
    evaluations = [r for r in records if "eval_objective/scores" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                 "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
                 "episode", "learning_rate"):
        assert all(np.isfinite(r[name]) for r in rows), name
    assert rows[-1]["episode"] == 8 * 16
    scores = [r["objective/scores"] for r in rows]
    assert np.mean(scores[-2:]) > np.mean(scores[:2]) + 0.3
    assert [r["step"] for r in evaluations] == [8]
    assert evaluations[0]["eval_objective/scores"] > np.mean(scores[:2]) + 0.3  # sampled on the eval prompts
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the initial policy
    assert rows[-1]["objective/kl"] > 0.0
    assert (out / "final" / "config.json").exists() and (out / "value_model" / "config.json").exists()


def _lora(model, **options):
    from jaxpt.lora import LoraConfig, apply_lora

    return apply_lora(model, LoraConfig(use_peft=True, lora_r=4, lora_dropout=0.0, **options))


def _host_tree(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def test_lora_step_trains_only_adapters_and_value_head(tmp_path):
    """With adapters on the policy and the value model, a step trains the adapters and the value model's `score`
    head only (the bases come back bit for bit), and at B = 0 its loss is the full models' loss."""
    from jaxpt.lora import LoRAParam

    config = ppo.PPOConfig(output_dir=str(tmp_path), logits_chunk_size=4)
    n, prompt_length = 4, 3
    rng = np.random.default_rng(1)
    batch = {"prompt_ids": rng.integers(3, VOCAB, (1, n, prompt_length)).astype(np.int32),
             "prompt_mask": np.ones((1, n, prompt_length), np.int32),
             "completion_ids": rng.integers(3, VOCAB, (1, n, T)).astype(np.int32),
             "attention_mask": RESPONSE_MASK[None].astype(np.int32), "logprobs": np.float32(LOGPROBS[None]),
             "values": np.float32(rng.normal(size=(1, n, T)) * VALUE_MASK),
             "advantages": np.float32(rng.normal(size=(1, n, T)) * RESPONSE_MASK),
             "returns": np.float32(rng.normal(size=(1, n, T))), "response_mask": RESPONSE_MASK[None].astype(np.int32),
             "value_mask": VALUE_MASK[None].astype(np.int32)}
    step = ppo.make_train_step(config)
    full = TrainState.create(ppo.PolicyAndValue(tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1, num_labels=1)),
                             optax.sgd(0.1))
    _, full_metrics = step(full, batch)
    joint = ppo.PolicyAndValue(_lora(tiny_llama(VOCAB, seed=0)), _lora(tiny_llama(VOCAB, seed=1, num_labels=1)))
    state = TrainState.create(joint, optax.sgd(0.1))
    trained = {path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert trained and all(".lora_" in name or name.startswith("value_model.score.") for name in trained), trained
    assert any(name.startswith("policy.") for name in trained) and "value_model.score.weight" in trained
    is_lora = lambda x: isinstance(x, LoRAParam)  # noqa: E731
    assert not any(is_lora(v) for v in jax.tree.leaves(state.frozen, is_leaf=is_lora))
    frozen_before, trained_before = _host_tree(state.frozen), _host_tree(state.params)
    state, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-5)
    assert float(metrics["grad_norm"]) > 0
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(_host_tree(state.frozen)), strict=True):
        np.testing.assert_array_equal(before, after)  # the bases are bit-identical
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), trained_before, _host_tree(state.params))
    assert any(jax.tree.leaves(changed["policy"])) and all(jax.tree.leaves(changed["value_model"]["score"]))


def test_lora_train_reference_is_the_base_and_adapter_is_exported(tmp_path):
    """`train` with adapters on the policy (the value model in full, as TRL's PPO with peft): the first update's KL
    to the reference (the base, adapters off) is 0, the policy's base is unchanged, the value model trains, and the
    policy is exported as a peft adapter (and merged, merge_adapter_on_save), each loading back to the trained
    model's log-probs."""
    from jaxpt.lora import load_adapter

    policy, value_model = _lora(tiny_llama(VOCAB, seed=0)), tiny_llama(VOCAB, seed=1, num_labels=1)
    base = _host_tree(nnx.state(tiny_llama(VOCAB, seed=0)))
    value_before = _host_tree(nnx.state(value_model))
    prompts = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(2)]
    config = ppo.PPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8,
                           num_ppo_epochs=1, response_length=4, temperature=1.0, learning_rate=3e-2, kl_coef=0.01,
                           mesh_fsdp=1, logging_steps=1, save_steps=0, disable_tqdm=True, seed=0,
                           merge_adapter_on_save=True)
    result = ppo.train(policy, TOKENIZER, prompts, config, value_model=value_model, reward_funcs=[digit_reward])
    rows = [r for r in result.metrics if "objective/kl" in r]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["objective/kl"] != 0.0
    frozen = _host_tree(result.state.frozen["policy"])
    for before, after in zip(jax.tree.leaves(base), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(before, after)
    value_after = _host_tree(result.state.params["value_model"])
    assert any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(value_before), jax.tree.leaves(value_after),
                                                   strict=True))
    out = tmp_path / "out"
    assert (out / "final" / "adapter_config.json").exists() and (out / "value_model" / "config.json").exists()
    assert not (out / "value_model_merged").exists()  # the value model has no adapter to merge
    batch = {"prompt_ids": np.array([[5, 6, 7]], np.int32), "prompt_mask": np.ones((1, 3), np.int32),
             "completion_ids": np.array([[8, 9]], np.int32), "attention_mask": np.ones((1, 2), np.int32)}
    options = dict(temperature=1.0, chunk_size=4)
    trained = ppo.policy_logprobs(result.state.model().policy, batch, **options)[0]
    for exported in (load_adapter(tiny_llama(VOCAB, seed=0), out / "final"),
                     jaxpt.models.from_pretrained(out / "final_merged")):
        np.testing.assert_allclose(ppo.policy_logprobs(exported, batch, **options)[0], trained, rtol=1e-5, atol=1e-5)
