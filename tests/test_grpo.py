"""GRPO: batch arithmetic, rollouts, the jitted update (accumulation, mesh, log-probs) and the training loop."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpt import grpo, lora
from jaxpt.losses.logprobs import token_logps
from jaxpt.rollout import check_prompt_groups, completion_logps, make_logps_fn, shared_prompt_group
from jaxpt.sharding import batch_divisor, make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = datasets.Dataset.from_list([{"prompt": p, "tag": i} for i, p in enumerate(["ab", "cde", "f", "ghij"] * 4)])


def digits_reward(completions, **kwargs):
    """Dense toy reward: the fraction of characters that are digits (about 10% for a random policy)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, learning_rate=3e-2, max_steps=4, logging_steps=1, mesh_fsdp=1,
                    disable_tqdm=True, save_steps=0, save_final_model=False, seed=0)
    settings.update(overrides)
    return grpo.GRPOConfig(**settings)


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides,message", [
    ({"num_generations": 1}, "num_generations=1"),
    ({"loss_type": "ppo"}, "loss_type='ppo' is not a GRPO loss"),
    ({"scale_rewards": "z"}, "scale_rewards='z'"),
    ({"top_entropy_quantile": 0.0}, "top_entropy_quantile=0.0"),
    ({"generation_batch_size": 16, "steps_per_generation": 2}, "not both"),
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation='mean'"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg=0.0"),
    ({"vespo_lambda_neg": -1.0}, "vespo_lambda_neg must be >= 0"),
    ({"loss_type": "vespo", "sampler_importance_sampling_correction": True}, "'token_truncate' or 'token_mask'"),
    ({"off_policy_mask_threshold": -0.5}, "off_policy_mask_threshold=-0.5"),
    ({"use_adaptive_entropy": True, "entropy_coef": 2.0}, r"entropy_coef=2.0 must lie in \[entropy_coef_min"),
    ({"repetition_penalty": -1.0}, "repetition_penalty=-1.0 must be > 0"),
    ({"generation_kwargs": {"suppress_tokens": [1]}}, "generation_kwargs has 'suppress_tokens'"),
    ({"num_generations_eval": 1}, "num_generations_eval=1"),
])
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_rollout_shape_follows_trl_batch_arithmetic(tmp_path):
    assert grpo.rollout_shape(config(tmp_path), devices=1) == (8, 1, 2)
    assert grpo.rollout_shape(config(tmp_path, gradient_accumulation_steps=2), devices=2) == (16, 2, 8)
    assert grpo.rollout_shape(config(tmp_path, generation_batch_size=32), devices=1) == (8, 4, 8)
    with pytest.raises(ValueError, match="divisible by num_generations=3"):
        grpo.rollout_shape(config(tmp_path, num_generations=3), devices=1)
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        grpo.rollout_shape(config(tmp_path, steps_per_generation=3, gradient_accumulation_steps=2), devices=1)


@pytest.fixture(scope="module")
def rollout_arrays(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("rollout"))
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(0.1))
    prompts = grpo.data.prepare_prompts(PROMPTS, TOKENIZER, method="GRPO")[:4]
    arrays, metrics, records = grpo.rollout(state, prompts, [digits_reward], TOKENIZER, cfg,
                                            key=jax.random.key(0), mesh=None, prompt_buckets=[16])
    return cfg, state, arrays, metrics, records


def test_shared_prompt_group_needs_whole_groups_split_evenly(rollout_arrays):
    """The update runs each prompt once per group when every micro-batch holds whole groups in the rollout's order
    and the groups split evenly over the mesh's batch axes; the loop checks every rollout's order."""
    assert shared_prompt_group(4, 8) == 4
    assert shared_prompt_group(4, 6) == 1  # a group split between micro-batches
    assert shared_prompt_group(4, 32, devices=8) == 4
    assert shared_prompt_group(4, 16, devices=8) == 1  # 4 prompts on 8 devices
    assert shared_prompt_group(4, 8, tools=object()) == 1
    # LoRA dropout draws masks per row and token: rows do not share their prompt's computation then
    assert shared_prompt_group(4, 8, adapter_dropout=True) == 1
    for rate, expected in ((0.05, True), (0.0, False)):
        adapted = lora.apply_lora(tiny_llama(VOCAB), lora.LoraConfig(use_peft=True, lora_r=2, lora_dropout=rate))
        assert lora.has_adapter_dropout(adapted) is expected
    assert not lora.has_adapter_dropout(tiny_llama(VOCAB))
    _, _, arrays, _, _ = rollout_arrays
    check_prompt_groups(arrays, 4)
    swapped = dict(arrays, prompt_ids=arrays["prompt_ids"][[0, 1, 2, 4, 3, *range(5, 16)]])
    with pytest.raises(RuntimeError, match="prompts do not come in runs of 4"):
        check_prompt_groups(swapped, 4)


def test_rollout_groups_scores_and_logs(rollout_arrays):
    cfg, _, arrays, metrics, records = rollout_arrays
    assert arrays["completion_ids"].shape == (16, 8) and arrays["prompt_ids"].shape == (16, 16)
    assert records[0]["prompt"] == records[3]["prompt"] == "ab" and records[4]["prompt"] == "cde"
    advantages = arrays["advantages"].reshape(4, 4)
    np.testing.assert_allclose(advantages.mean(1), 0.0, atol=1e-5)  # group-centred
    expected = np.asarray([r["digits_reward"] for r in records]).mean()
    assert metrics["reward"] == pytest.approx(expected, rel=1e-5)
    assert {"reward_std", "frac_reward_zero_std", "rewards/digits_reward/mean", "completions/mean_length",
            "completions/clipped_ratio"} <= set(metrics)


def test_training_log_probs_equal_sampler_and_teacher_forced(rollout_arrays):
    """The update's completion log-probs (chunked, from hidden states) equal the sampler's and a full forward
    pass's log softmax(logits / temperature) on the completion tokens."""
    _, state, arrays, _, _ = rollout_arrays
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    logps, _ = completion_logps(state.params, state.graphdef, batch, temperature=0.7)
    ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], -1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["attention_mask"]], -1)
    logits = state.model()(ids, attention_mask=mask)
    prompt_length = batch["prompt_ids"].shape[1]
    expected = token_logps(logits[:, prompt_length - 1:-1], batch["completion_ids"], temperature=0.7)
    valid = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(np.asarray(logps)[valid], np.asarray(expected)[valid], atol=1e-5)
    # each prompt run once for its 4 completions: the same log-probs
    shared, _ = completion_logps(state.params, state.graphdef, batch, temperature=0.7, prompt_group=4)
    np.testing.assert_allclose(np.asarray(shared)[valid], np.asarray(expected)[valid], atol=1e-5)
    # the old/reference log-prob function shares prompts only for rows in runs of 4: rows in another order (an
    # evaluation rollout with another num_generations_eval) get a row each, and still their own log-probs
    logps_fn = make_logps_fn(state.graphdef, temperature=0.7, chunk_size=1024, micro_batch=16, prompt_group=4)
    np.testing.assert_allclose(logps_fn(state.params, arrays)[valid], np.asarray(expected)[valid], atol=1e-5)
    interleaved = np.arange(16).reshape(4, 4).T.ravel()  # 0, 4, 8, 12, 1, ...: no two neighbours share a prompt
    # such rows in a step that assumes runs of 4: NaN, loudly, not another prompt's log-probs
    mixed_batch = {k: v[interleaved] for k, v in batch.items()}
    nan_logps, nan_entropy = completion_logps(state.params, state.graphdef, mixed_batch, temperature=0.7,
                                              prompt_group=4)
    assert np.isnan(np.asarray(nan_logps)).all() and np.isnan(np.asarray(nan_entropy)).all()
    with pytest.raises(ValueError, match="prompt_group=0 must be an int >= 1"):
        completion_logps(state.params, state.graphdef, batch, temperature=0.7, prompt_group=0)
    with pytest.raises(ValueError, match="16 rows do not split into groups of 3"):
        completion_logps(state.params, state.graphdef, batch, temperature=0.7, prompt_group=3)
    mixed = logps_fn(state.params, {k: v[interleaved] for k, v in arrays.items()})
    np.testing.assert_allclose(mixed[valid[interleaved]], np.asarray(expected)[interleaved][valid[interleaved]],
                               atol=1e-5)
    # the rollout sampled at temperature 1.0: its log-probs match the same computation at 1.0
    logps_t1, _ = completion_logps(state.params, state.graphdef, batch, temperature=1.0)
    np.testing.assert_allclose(np.asarray(logps_t1)[valid], arrays["sampler_logps"][valid], atol=2e-5)


def _one_step(cfg, arrays, accumulation, mesh=None, prompt_group=1):
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(1.0), mesh=mesh)
    step = grpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh), prompt_group=prompt_group)
    batch = {k: v.reshape(accumulation, -1, *v.shape[1:]) for k, v in arrays.items()}
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


@pytest.fixture(scope="module")
def off_policy_arrays(rollout_arrays):
    """The rollout with old log-probs perturbed away from the sampler's: the ratios clip some tokens."""
    _, _, arrays, _, _ = rollout_arrays
    noise = 0.3 * np.random.RandomState(0).randn(*arrays["sampler_logps"].shape)
    return dict(arrays, old_logps=arrays["sampler_logps"] + noise)


@pytest.fixture(scope="module")
def unsharded_dapo_step():
    """The one-big-batch DAPO step of test_accumulation_equals_one_big_batch, kept for the mesh test (the same
    compiled step compared twice): filled by whichever of the two runs first."""
    return {}


@pytest.mark.parametrize("loss_type,options", [
    ("dapo", {}), ("grpo", {}), ("dr_grpo", {}),
    ("cispo", {"epsilon_high": 1.2, "entropy_coef": 0.05}),  # with the entropy bonus (differentiated entropies)
    ("sapo", {}), ("luspo", {"importance_sampling_level": "sequence", "epsilon": 0.05}),
    ("vespo", {"off_policy_mask_threshold": 0.05}),
])
def test_accumulation_equals_one_big_batch(rollout_arrays, off_policy_arrays, unsharded_dapo_step, loss_type,
                                           options):
    cfg = rollout_arrays[0].replace(loss_type=loss_type, **options)
    if loss_type == "dapo":
        if not unsharded_dapo_step:
            unsharded_dapo_step["result"] = _one_step(cfg, off_policy_arrays, 1)
        metrics_1, params_1 = unsharded_dapo_step["result"]
    else:
        metrics_1, params_1 = _one_step(cfg, off_policy_arrays, 1)
    # the accumulated step also runs each micro-batch's prompt once for its 4 completions (what grpo.train does)
    metrics_4, params_4 = _one_step(cfg, off_policy_arrays, 4, prompt_group=4)
    activity = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean"}.get(loss_type, "clip_ratio/region_mean")
    keys = ["loss", "grad_norm", "entropy"] + ([] if loss_type == "sapo" else [activity])
    keys += ["policy_loss", "entropy_coef", "entropy_bonus_mean"] if "entropy_coef" in options else []
    for key in keys:
        assert metrics_4[key] == pytest.approx(metrics_1[key], rel=1e-4, abs=1e-7), key
    if loss_type != "sapo":
        assert metrics_1[activity] > 0  # the perturbed old log-probs clip some tokens
    if "entropy_coef" in options:  # the bonus is in the loss: loss = policy loss - coef * mean entropy
        assert metrics_1["loss"] == pytest.approx(metrics_1["policy_loss"] - 0.05 * metrics_1["entropy"], rel=1e-5)
    for name in params_1:
        np.testing.assert_allclose(params_4[name], params_1[name], atol=1e-6, err_msg=str(name))


def test_eight_device_mesh_equals_unsharded(rollout_arrays, off_policy_arrays, unsharded_dapo_step):
    """The DAPO step (off-policy: some ratios clip) on a data x fsdp x tensor mesh, with each prompt run once for
    its group (one prompt per device), equals the unsharded one with a row per completion."""
    cfg = rollout_arrays[0]
    assert cfg.loss_type == "dapo"
    if not unsharded_dapo_step:
        unsharded_dapo_step["result"] = _one_step(cfg, off_policy_arrays, 1)
    metrics, params = unsharded_dapo_step["result"]
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert shared_prompt_group(cfg.num_generations, 16, devices=batch_divisor(mesh)) == 4
    mesh_metrics, mesh_params = _one_step(cfg, off_policy_arrays, 1, mesh=mesh, prompt_group=4)
    assert metrics["clip_ratio/region_mean"] > 0
    for key in ("loss", "grad_norm", "clip_ratio/region_mean"):
        assert mesh_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    for name in params:
        np.testing.assert_allclose(mesh_params[name], params[name], atol=1e-6, err_msg=str(name))


def test_grpo_raises_the_mean_reward(tmp_path):
    result = grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path, max_steps=20),
                        reward_funcs=[digits_reward])
    rewards = [r["reward"] for r in result.metrics]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2
    records = read_metrics(tmp_path)
    assert {"loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/digits_reward/mean",
            "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
            "num_tokens"} <= set(records[0])


def test_kl_iterations_sync_ref_model_and_resume(tmp_path, monkeypatch):
    """beta > 0 (reference log-probs, `kl` logged), two iterations per rollout (off-policy ratios), TR-DPO's hard
    reference synchronisation (alpha = 1 after step 2: the reference becomes the policy, so the next rollout's KL is
    exactly 0, where a fixed reference's grows), and a crash after the checkpoint of step 2 resumed to reproduce the
    uninterrupted run: the checkpoint holds the synced reference (the resumed run is given the initial one)."""
    cfg = config(tmp_path / "full", beta=0.1, num_iterations=2, max_steps=4, sync_ref_model=True,
                 ref_model_mixup_alpha=1.0, ref_model_sync_steps=2)
    grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, cfg, reward_funcs=[digits_reward])
    full = read_metrics(tmp_path / "full")
    # Step 1 trains the reference itself on its own samples: no KL, no clipping. The second pass over each
    # rollout (steps 2 and 4) is off-policy and clips; the first pass over a new rollout (step 3) does not. Step 3's
    # rollout is scored against the reference synced to the policy of step 2: KL 0 again.
    assert full[0]["kl"] == pytest.approx(0.0, abs=1e-6) and full[2]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert full[1]["kl"] > 1e-3 and full[3]["kl"] > 1e-3
    assert [r["clip_ratio/region_mean"] > 0 for r in full] == [False, True, False, True]
    assert full[-1]["grad_norm"] > 0

    resumed_cfg = cfg.replace(output_dir=str(tmp_path / "resumed"), save_steps=2)
    real_rollout, calls = grpo.rollout, []

    def crashing_rollout(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(grpo, "rollout", crashing_rollout)
    with pytest.raises(KeyboardInterrupt):
        grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, resumed_cfg, reward_funcs=[digits_reward])
    monkeypatch.setattr(grpo, "rollout", real_rollout)
    grpo.train(tiny_llama(VOCAB, seed=7), TOKENIZER, PROMPTS, resumed_cfg.replace(resume_from_checkpoint="latest"),
               reward_funcs=[digits_reward], ref_model=tiny_llama(VOCAB))
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)


def test_entropy_bonus_step_raises_the_entropy(rollout_arrays):
    """With zero advantages only the bonus moves the parameters: one step raises the mean entropy of the batch."""
    cfg, state, arrays, _, _ = rollout_arrays
    arrays = dict(arrays, advantages=np.zeros_like(arrays["advantages"]))
    metrics, params = _one_step(cfg.replace(entropy_coef=1.0), arrays, 2)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    updated = nnx.from_flat_state({name: value for name, value in params.items()})
    mask = arrays["completion_mask"].astype(bool)
    before = np.asarray(completion_logps(state.params, state.graphdef, batch, temperature=1.0)[1])[mask].mean()
    after = np.asarray(completion_logps(updated, state.graphdef, batch, temperature=1.0)[1])[mask].mean()
    assert metrics["entropy"] == pytest.approx(before, rel=1e-5)
    assert metrics["policy_loss"] == pytest.approx(0.0, abs=1e-7)
    assert after > before + 1e-3


def test_adaptive_entropy_control_and_gdpo(tmp_path):
    """Adaptive control applies no bonus before its first measurement and moves its coefficient by
    entropy_coef_delta per step toward the target; GDPO (normalize_then_sum) trains with two reward functions."""
    def length_reward(completions, **kwargs):
        return [len(c) / 8 for c in completions]

    cfg = config(tmp_path, use_adaptive_entropy=True, entropy_coef=0.3, entropy_coef_delta=0.1, entropy_target=100.0,
                 multi_objective_aggregation="normalize_then_sum", max_steps=3)
    adaptive = grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, cfg, reward_funcs=[digits_reward, length_reward])
    # entropy (a few nats) is below the target, so the coefficient rises each step; the first step applies none
    assert [round(r["entropy_coef"], 6) for r in adaptive.metrics] == [0.4, 0.5, 0.6]
    first, second = adaptive.metrics[:2]
    assert first["loss"] == pytest.approx(first["policy_loss"], abs=1e-7)
    assert second["loss"] == pytest.approx(second["policy_loss"] - 0.4 * second["entropy_bonus_mean"], rel=1e-4)
    assert {"rewards/digits_reward/mean", "rewards/length_reward/mean", "frac_reward_zero_std"} <= set(first)


def test_bad_reward_functions_fail_early(tmp_path):
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path), reward_funcs=[])
    with pytest.raises(ValueError, match="Unknown reward function 'nope'"):
        grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path), reward_funcs=["nope"])
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path, reward_weights=[1.0, 2.0]),
                   reward_funcs=[digits_reward])
    with pytest.raises(ValueError, match="GRPO needs a prompt_only"):
        grpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list([{"text": "x"}]), config(tmp_path),
                   reward_funcs=[digits_reward])


def test_sync_ref_model_config_is_checked(tmp_path):
    """(The synchronisation itself: test_kl_iterations_sync_ref_model_and_resume.)"""
    with pytest.raises(ValueError, match="sync_ref_model=True with beta=0.0"):
        config(tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="ref_model_sync_steps=0 must be >= 1"):
        config(tmp_path, sync_ref_model=True, beta=0.1, ref_model_sync_steps=0)
