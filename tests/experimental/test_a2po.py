"""A*-PO: the loss against TRL 1.16's own `A2POTrainer.compute_loss` on fixed sequence log-probs (loss, gradient,
metrics), V* against the paper's formula in float64, config checks, and a tiny model that raises its reward.

TRL's method is driven without a model: a bare `A2POTrainer` (no `__init__`) gets the attributes `compute_loss`
reads, and `_get_sequence_logps` returns fixed float64 sequence log-probs as a leaf tensor, so torch autograd gives
TRL's gradient with respect to them.
"""

import collections
import dataclasses
import json
import math
import types

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from trl.experimental.a2po import A2POConfig as TRLA2POConfig  # a test dependency: parity fails, never skips
from trl.experimental.a2po import A2POTrainer

from jaxpt import data
from jaxpt.experimental import a2po
from jaxpt.rollout import make_logps_fn, make_ref_logps_fn
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

BATCH = 6


def fixed_inputs(seed=0):
    rng = np.random.default_rng(seed)
    ref_logps = -rng.uniform(5.0, 30.0, BATCH)
    return dict(policy_logps=ref_logps + rng.normal(0.0, 40.0, BATCH), ref_logps=ref_logps,
                rewards=np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), v_star=rng.uniform(0.0, 0.9, BATCH))


def trl_a2po(inputs, *, beta2):
    """TRL's `A2POTrainer.compute_loss` on `inputs`: (loss, d loss / d policy_logps, logged metrics)."""
    trainer = object.__new__(A2POTrainer)
    trainer.args = types.SimpleNamespace(beta2=beta2)
    trainer.model = types.SimpleNamespace(training=True)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    policy_logps = torch.tensor(inputs["policy_logps"], dtype=torch.float64, requires_grad=True)
    trainer._get_sequence_logps = lambda *args, **kwargs: policy_logps
    batch = {"input_ids": None, "attention_mask": None, "logits_to_keep": 3,
             **{k: torch.tensor(inputs[k], dtype=torch.float64) for k in ("ref_logps", "rewards", "v_star")}}
    loss = trainer.compute_loss(None, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.item(), policy_logps.grad.numpy(), metrics


@pytest.mark.parametrize("beta2", [1e-3, 0.05])
def test_loss_gradient_and_metrics_match_trl(beta2):
    inputs = fixed_inputs()
    trl_loss, trl_grad, trl_metrics = trl_a2po(inputs, beta2=beta2)
    with jax.enable_x64(True):
        def loss_of(policy_logps):
            return a2po.a2po_loss(policy_logps, *(jnp.asarray(inputs[k]) for k in ("ref_logps", "rewards", "v_star")),
                                  beta2=beta2)

        (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(inputs["policy_logps"]))
    assert float(loss) == pytest.approx(trl_loss, rel=1e-12)
    np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=1e-10, atol=1e-14)
    assert np.abs(trl_grad).max() > 1e-4
    assert set(metrics) == set(trl_metrics) == {"implicit_reward", "advantage"}
    for key in trl_metrics:  # metrics are float32 sums and counts
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-6), key


def test_optimal_values_follow_the_formula_in_float64():
    """V*(x) = beta1 log(mean_i exp(r_i / beta1)), TRL's and the paper's estimate, computed independently."""
    rewards = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [1] * 8, [1, 0, 0, 0, 0, 0, 0, 0]], np.float64)
    for beta1 in (0.5, 0.05):
        expected = [beta1 * math.log(sum(math.exp(r / beta1) for r in row) / len(row)) for row in rewards]
        with jax.enable_x64(True):
            got = np.asarray(a2po.optimal_values(jnp.asarray(rewards), beta1=beta1))
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[1] == 0.0 and got[2] == pytest.approx(1.0)  # all wrong: 0; all right: 1
    assert 0.1 < got[3] < 1.0  # a small beta1 leans towards the best sample (max as beta1 -> 0)


def test_stage_one_matches_trls_estimate_optimal_values(monkeypatch):
    """Stage 1 on the same samples: TRL's `_estimate_optimal_values` (its reference model a stub whose `generate`
    returns fixed completions) and jaxpt's `estimate_optimal_values` (its sampler replaced by the same rewards) give
    the same V* per prompt and drop the same all-incorrect prompts."""
    from accelerate import Accelerator

    samples = 4
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    prompts = ["ab", "cd", "ef", "gh", "ij"]
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"

    class FixedSampler(torch.nn.Module):
        is_gradient_checkpointing = False

        def generate(self, input_ids, attention_mask=None, generation_config=None):
            completions = [[tokenizer.convert_tokens_to_ids("7" if right else "x")] * 2
                           for row in correct for right in row]
            return torch.cat([input_ids.repeat_interleave(samples, dim=0), torch.tensor(completions)], dim=1)

    trainer = object.__new__(A2POTrainer)
    trainer.args = types.SimpleNamespace(beta1=0.5, num_value_samples=samples, per_device_train_batch_size=len(prompts),
                                         max_prompt_length=512, filter_all_incorrect=True)
    trainer.accelerator = Accelerator(cpu=True)
    trainer.train_dataset, trainer.eval_dataset = datasets.Dataset.from_list([{"prompt": p} for p in prompts]), None
    trainer.processing_class, trainer.ref_model, trainer.value_generation_config = tokenizer, FixedSampler(), None
    trainer.reward_funcs, trainer.reward_weights = [has_a_digit], torch.ones(1)
    trainer._estimate_optimal_values()

    def fixed_rewards(state, chunk, *args, **kwargs):
        return types.SimpleNamespace(rewards=correct.reshape(-1, 1).astype(np.float32))

    monkeypatch.setattr(a2po, "sample_and_score", fixed_rewards)
    config = a2po.A2POConfig(output_dir="unused", beta1=0.5, num_value_samples=samples)
    with jax.enable_x64(True):
        v_star, all_incorrect, _ = a2po.estimate_optimal_values(
            None, [{"prompt": p} for p in prompts], [has_a_digit], tokenizer, config, key=jax.random.key(0),
            mesh=None, prompt_buckets=[16], prompts_per_batch=len(prompts))
    np.testing.assert_allclose(v_star, [trainer._optimal_values[p] for p in prompts], rtol=1e-6)
    assert [p for p, drop in zip(prompts, all_incorrect, strict=True) if not drop] == trainer.train_dataset["prompt"]
    assert trainer.train_dataset["prompt"] == ["ab", "ef", "gh"]


def test_config_defaults_are_trls_and_bad_values_fail(tmp_path):
    trl_defaults = {f.name: f.default for f in dataclasses.fields(TRLA2POConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(a2po.A2POConfig)}
    for name in ("max_prompt_length", "max_completion_length", "temperature", "top_p", "top_k", "num_value_samples",
                 "beta1", "filter_all_incorrect", "beta2", "reward_weights", "learning_rate"):
        assert defaults[name] == trl_defaults[name], name
    for overrides, message in (({"beta1": 0.0}, "beta1=0.0"), ({"num_value_samples": 0}, "num_value_samples=0")):
        with pytest.raises(ValueError, match=message):
            a2po.A2POConfig(output_dir=str(tmp_path), **overrides)


TOKENIZER = char_tokenizer()
PROMPTS = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])


def has_a_digit(completions, **kwargs):
    """Binary reward (A*-PO's assumption): 1 when the completion holds a digit (about 1 in 4 at first)."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def never_right(completions, **kwargs):
    return [0.0] * len(completions)


def test_a2po_raises_the_mean_reward(tmp_path):
    config = a2po.A2POConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=4,
                             num_value_samples=4, beta2=0.1, learning_rate=5e-2, max_steps=20, logging_steps=1,
                             mesh_fsdp=1, disable_tqdm=True, save_steps=0, save_final_model=False, seed=0,
                             filter_all_incorrect=False)  # 16 prompts: filtered, too few for a batch of 8
    eval_config = config.replace(eval_strategy="steps", eval_steps=20, per_device_eval_batch_size=8)
    result = a2po.train(tiny_llama(len(TOKENIZER)), TOKENIZER, PROMPTS, eval_config, reward_funcs=[has_a_digit],
                        eval_dataset=PROMPTS.select(range(5)))
    evaluations = [r for r in result.metrics if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [20]  # TRL's names, on 5 prompts filled up to a batch of 8
    assert {"eval_loss", "eval_reward", "eval_v_star", "eval_implicit_reward", "eval_advantage"} <= set(evaluations[0])
    assert 0 < evaluations[0]["eval_v_star"] < 1
    assert evaluations[0]["eval_advantage"] == pytest.approx(evaluations[0]["eval_reward"]
                                                             - evaluations[0]["eval_v_star"], abs=1e-6)
    rewards = [r["reward"] for r in result.metrics if "reward" in r]
    # against the initial policy's rate measured in stage 1 (64 reference samples: less noisy than a first step)
    initial = result.metrics[0]["value_estimation/reward"]
    assert np.mean(rewards[-4:]) > initial + 0.25, (initial, rewards)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "grad_norm", "reward", "v_star", "implicit_reward", "advantage",
            "completions/mean_length"} <= set(record)
    assert 0 < record["v_star"] < 1

    # filter_all_incorrect drops the prompts whose reference samples all scored 0: here every one, which fails
    with pytest.raises(ValueError, match="leaves no prompt to train on"):
        a2po.train(tiny_llama(len(TOKENIZER)), TOKENIZER, PROMPTS, config.replace(
            filter_all_incorrect=True, output_dir=str(tmp_path / "filtered")), reward_funcs=[never_right])


def sequence_logps(model, arrays):
    """Sum of the completion tokens' log-probs, from the model's full logits in float64."""
    ids = np.concatenate([arrays["prompt_ids"], arrays["completion_ids"]], 1)
    mask = np.concatenate([arrays["prompt_mask"], arrays["attention_mask"]], 1)
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float64)
    prompt_length, length = arrays["prompt_ids"].shape[1], arrays["completion_ids"].shape[1]
    rows = logits[:, prompt_length - 1:prompt_length + length - 1]
    top = rows.max(-1, keepdims=True)
    log_probs = rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))
    token = np.take_along_axis(log_probs, arrays["completion_ids"][..., None], -1)[..., 0]
    return (token * arrays["completion_mask"]).sum(1)


def test_evaluation_is_the_loss_on_fresh_samples(tmp_path):
    """`evaluate`: one completion per eval prompt from the policy (3 prompts in batches of 2, the fill-up left out),
    and the loss and TRL's metrics recomputed here in float64 from those completions, the policy's and a separate
    reference's full logits, the rewards and V*."""
    policy, reference = tiny_llama(len(TOKENIZER), seed=0), tiny_llama(len(TOKENIZER), seed=1)
    config = a2po.A2POConfig(output_dir=str(tmp_path), max_completion_length=4, beta2=0.1, seed=3, mesh_fsdp=1,
                             logits_chunk_size=4)
    state = TrainState.create(policy, optax.identity())
    prompts = data.prepare_prompts(datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f"]]), TOKENIZER,
                                   method="A2PO", max_prompt_length=None)
    v_star = np.array([0.2, 0.5, 0.7], np.float32)
    logps_fn = make_logps_fn(state.graphdef, temperature=1.0, chunk_size=4, micro_batch=2)
    ref_logps_fn = make_ref_logps_fn(nnx.state(reference, nnx.Param), state.graphdef, temperature=1.0, chunk_size=4,
                                     micro_batch=2, logps_fn=logps_fn)
    metrics = a2po.evaluate(state, prompts, v_star, [has_a_digit], TOKENIZER, config, mesh=None, prompt_buckets=[16],
                            batch_size=2, logps_fn=logps_fn, ref_logps_fn=ref_logps_fn)

    implicit, target, rewards, values = [], [], [], []
    key = jax.random.key(config.seed + 1)
    for index, (rows, chunk_v) in enumerate((([0, 1], [0.2, 0.5]), ([2, 2], [0.7, 0.7]))):
        arrays, _ = a2po.rollout(state, [prompts[i] for i in rows], np.float32(chunk_v), [has_a_digit], TOKENIZER,
                                 config, key=jax.random.fold_in(key, index), mesh=None, prompt_buckets=[16],
                                 ref_logps_fn=ref_logps_fn)  # the very draws `evaluate` made
        real = slice(0, 2 if index == 0 else 1)
        implicit.extend((0.1 * (sequence_logps(policy, arrays) - sequence_logps(reference, arrays)))[real])
        target.extend((arrays["rewards"] - np.asarray(chunk_v))[real])
        rewards.extend(arrays["rewards"][real])
        values.extend(np.asarray(chunk_v)[real])
    implicit, target = np.asarray(implicit), np.asarray(target)
    expected = {"eval_loss": np.mean((implicit - target) ** 2), "eval_implicit_reward": implicit.mean(),
                "eval_advantage": target.mean(), "eval_reward": np.mean(rewards), "eval_v_star": np.mean(values)}
    assert abs(implicit).max() > 0.05  # a reference unlike the policy
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
