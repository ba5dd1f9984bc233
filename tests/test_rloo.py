"""RLOO: leave-one-out rollouts with the KL penalty, the jitted update and the training loop."""

import json

import datasets
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpt import rloo
from jaxpt.rollout import make_logps_fn
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])


def digits_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, learning_rate=3e-2, max_steps=4, logging_steps=1, mesh_fsdp=1,
                    disable_tqdm=True, save_steps=0, save_final_model=False, seed=0, beta=0.0)
    settings.update(overrides)
    return rloo.RLOOConfig(**settings)


def test_rollout_advantages_are_leave_one_out_with_the_kl_penalty(tmp_path):
    cfg = config(tmp_path, beta=0.5)
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(0.1))
    prompts = rloo.data.prepare_prompts(PROMPTS, TOKENIZER, method="RLOO")[:4]
    ref_logps = {}

    def fake_reference(arrays):  # a reference that differs from the policy, so the penalty matters
        ref_logps["value"] = arrays["old_logps"] - 0.1 * arrays["attention_mask"]
        return ref_logps["value"]

    policy_logps_fn = make_logps_fn(state.graphdef, temperature=cfg.temperature, chunk_size=cfg.logits_chunk_size,
                                    micro_batch=8)
    arrays, metrics, records = rloo.rollout(state, prompts, [digits_reward], TOKENIZER, cfg, key=jax.random.key(1),
                                            mesh=None, prompt_buckets=[16], ref_logps_fn=fake_reference,
                                            policy_logps_fn=policy_logps_fn)
    rewards = np.asarray([r["digits_reward"] for r in records])
    kl = ((arrays["old_logps"] - ref_logps["value"]) * arrays["completion_mask"]).sum(-1)
    penalised = (rewards - 0.5 * kl).reshape(4, 4)
    baseline = (penalised.sum(1, keepdims=True) - penalised) / 3
    np.testing.assert_allclose(arrays["advantages"], (penalised - baseline).reshape(-1), rtol=1e-5, atol=1e-6)
    assert metrics["kl"] == pytest.approx(0.1, rel=1e-5)


def test_accumulation_equals_one_big_batch(tmp_path):
    cfg = config(tmp_path)
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(1.0))
    prompts = rloo.data.prepare_prompts(PROMPTS, TOKENIZER, method="RLOO")[:4]
    arrays, _, _ = rloo.rollout(state, prompts, [digits_reward], TOKENIZER, cfg, key=jax.random.key(0), mesh=None,
                                prompt_buckets=[16])
    noise = 0.05 * np.random.RandomState(0).randn(*arrays["sampler_logps"].shape)
    arrays["old_logps"] = arrays["sampler_logps"] + noise

    def one_step(accumulation):
        fresh = TrainState.create(tiny_llama(VOCAB), optax.sgd(1.0))
        step = rloo.make_train_step(cfg)
        batch = {k: v.reshape(accumulation, -1, *v.shape[1:]) for k, v in arrays.items()}
        fresh, metrics = step(fresh, batch)
        return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(fresh.params)}

    metrics_1, params_1 = one_step(1)
    metrics_4, params_4 = one_step(4)
    for key in ("loss", "grad_norm", "entropy", "clip_ratio/region_mean"):
        assert metrics_4[key] == pytest.approx(metrics_1[key], rel=1e-4, abs=1e-7), key
    for name in params_1:
        np.testing.assert_allclose(params_4[name], params_1[name], atol=1e-6, err_msg=str(name))


def test_rloo_raises_the_mean_reward_and_logs_trl_metrics(tmp_path):
    cfg = config(tmp_path, max_steps=20, beta=0.01, eval_strategy="steps", eval_steps=20, num_generations_eval=8)
    scored = []  # completions per reward call: 8 per training rollout, 2 prompts x num_generations_eval in evaluation

    def counted_digits_reward(completions, **kwargs):
        scored.append(len(completions))
        return digits_reward(completions)

    result = rloo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, cfg, reward_funcs=[counted_digits_reward],
                        eval_dataset=PROMPTS.select(range(4)))
    assert scored == [8] * 20 + [16] * 2
    rewards = [r["reward"] for r in result.metrics if "reward" in r]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/counted_digits_reward/mean", "kl",
            "entropy", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio"} <= set(
        records[0])
    # the fixed reference (the initial policy) is exactly the policy at step 1, then the policy drifts away from it
    # (the synced reference does not: test_sync_ref_model_hard_updates_keep_the_kl_at_zero)
    trained = [r for r in records if "kl" in r]
    assert [r["step"] for r in trained] == list(range(1, 21))
    assert trained[0]["kl"] == pytest.approx(0.0, abs=1e-6) and trained[-1]["kl"] > 1e-3
    # evaluation rolls out with the reference too (beta != 0 puts the KL penalty in the reward)
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [20] and evals[0]["eval_kl"] > 0


@pytest.mark.parametrize("overrides,message", [
    ({"num_generations": 1}, "num_generations=1"),
    ({"reward_clip_range": [1.0]}, "reward_clip_range"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be > 0"),
    ({"generation_kwargs": {"num_beams": 4}}, "generation_kwargs has 'num_beams'"),
    ({"generation_kwargs": {"temperature": 0.5}}, "set temperature itself"),
    ({"generation_kwargs": {"top_p": 0.0}}, "generation_kwargs=.*top_p=0.0"),
    ({"generation_kwargs": "{top_k: 2}"}, "not valid JSON"),
    ({"num_generations_eval": 1}, "num_generations_eval=1"),
])
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_sampling_options_reach_the_sampler(tmp_path, monkeypatch):
    """repetition_penalty and generation_kwargs (JSON from the command line too) are what the rollout's sampler
    gets, generation_kwargs overriding the fields; num_generations_eval must give whole evaluation micro-batches."""
    import jaxpt.rollout

    cfg = config(tmp_path, repetition_penalty=1.3, top_k=7, generation_kwargs='{"top_k": 3, "min_p": 0.05}')
    assert cfg.generation_kwargs == {"top_k": 3, "min_p": 0.05}
    received = {}

    def fake_generate(*args, **kwargs):
        received.update(kwargs)
        raise RuntimeError("stop before sampling")

    monkeypatch.setattr(jaxpt.rollout, "generate", fake_generate)
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(0.1))
    prompts = rloo.data.prepare_prompts(PROMPTS, TOKENIZER, method="RLOO")[:2]
    with pytest.raises(RuntimeError, match="stop before sampling"):
        rloo.rollout(state, prompts, [digits_reward], TOKENIZER, cfg, key=jax.random.key(0), mesh=None,
                     prompt_buckets=[16])
    assert {k: received[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")} == {
        "temperature": 1.0, "top_k": 3, "top_p": None, "min_p": 0.05, "repetition_penalty": 1.3}
    assert jaxpt.rollout.eval_config(config(tmp_path, num_generations_eval=6), prompts_per_rollout=2,
                                     micro_batch=4).num_generations == 6
    with pytest.raises(ValueError, match="num_generations_eval=3"):
        jaxpt.rollout.eval_config(config(tmp_path, num_generations_eval=3), prompts_per_rollout=2, micro_batch=4)


def test_sync_ref_model_hard_updates_keep_the_kl_at_zero(tmp_path):
    """TR-DPO's reference synchronisation (TRL's RLOO has it): with alpha = 1 every step the reference becomes the
    policy, so each next rollout's KL to it is exactly 0, where the fixed reference drifts away (its KL grows:
    test_rloo_raises_the_mean_reward_and_logs_trl_metrics). Resumed from the step-2 checkpoint, the run continues
    against the saved synced reference (KL 0 again, the same loss)."""
    synced_config = config(tmp_path / "synced", sync_ref_model=True, ref_model_mixup_alpha=1.0,
                           ref_model_sync_steps=1, save_steps=2, beta=0.5, max_steps=3, learning_rate=0.1)
    synced = rloo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, synced_config, reward_funcs=[digits_reward]).metrics
    assert [r["kl"] for r in synced] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert synced[-1]["grad_norm"] > 0
    resumed = rloo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, synced_config.replace(resume_from_checkpoint="latest"),
                         reward_funcs=[digits_reward]).metrics
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the initial reference is far after 2 steps at lr 0.1
    assert resumed[0]["loss"] == pytest.approx(synced[2]["loss"], rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="sync_ref_model=True with beta=0.0"):
        config(tmp_path, sync_ref_model=True, beta=0.0)
    with pytest.raises(ValueError, match="ref_model_mixup_alpha=-0.1 must be in"):
        config(tmp_path, sync_ref_model=True, beta=0.1, ref_model_mixup_alpha=-0.1)


def test_chat_template_kwargs_reach_the_template_of_conversational_prompts(tmp_path):
    """TRL's chat_template_kwargs: extra variables of the chat template when prompts are rendered; with plain-string
    prompts (no template applied) they fail instead of being ignored."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if think %}#{% endif %}"
    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "ab"}]}])
    plain = rloo.data.prepare_prompts(rows, tokenizer, method="RLOO")[0]["prompt_ids"]
    thinking = rloo.data.prepare_prompts(rows, tokenizer, method="RLOO",
                                         chat_template_kwargs={"think": True})[0]["prompt_ids"]
    assert thinking == plain + tokenizer("#", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="chat_template_kwargs=.*plain strings"):
        rloo.data.prepare_prompts(PROMPTS, tokenizer, method="RLOO", chat_template_kwargs={"think": True})
