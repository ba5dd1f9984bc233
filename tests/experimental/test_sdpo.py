"""SDPO against TRL 1.16's own code: `SDPOTrainer.compute_loss` (with its `_compute_self_distillation_loss` and
`_compute_policy_loss`) driven with fixed logits for every distillation mode, with and without old log-probs and the
policy term (loss, gradient, metrics); `SuccessfulRolloutTeacherContextBuilder` on a fixed rollout; the chunked
from-hidden path against the logits path; and a tiny model whose self-distillation divergence falls."""

import dataclasses
import types
from collections import defaultdict

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl.experimental.sdpo  # a test dependency: parity must fail, never skip, without it
from trl.experimental.sdpo import sdpo_trainer as trl_sdpo

from jaxpt import data
from jaxpt.experimental import sdpo
from jaxpt.sharding import shard_batch
from jaxpt.train_state import TrainState, make_optimizer
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama


def trl_config(tmp_path, **options):
    options = {"num_generations": 2, "per_device_train_batch_size": 4, **options}
    return trl.experimental.sdpo.SDPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                                            **options)


def trl_compute_loss(args, student_logits, teacher_logits, completion_ids, completion_mask, sd_mask, advantages,
                     old_logps=None):
    """`SDPOTrainer.compute_loss` on a stand-in trainer whose teacher/student forward returns the given logits."""
    trainer = types.SimpleNamespace(
        args=args, _name="SDPO", _metrics={"train": defaultdict(list)}, model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(gather=lambda x: x), current_gradient_accumulation_steps=1,
        use_teacher_server=False, teacher_model=None, importance_sampling_level=args.importance_sampling_level,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
        max_completion_length=args.max_completion_length)
    for name in ("_compute_self_distillation_loss", "_compute_policy_loss", "_log_self_distillation_metric"):
        setattr(trainer, name, types.MethodType(getattr(trl_sdpo.SDPOTrainer, name), trainer))
    logits = trl_sdpo.DistillationLogits(completion_ids=completion_ids, completion_mask=completion_mask,
                                         loss_mask=completion_mask * sd_mask[:, None], student_logits=student_logits,
                                         teacher_logits=teacher_logits)
    trainer._compute_teacher_student_logits = lambda model, teacher, inputs: logits
    trainer._forward_logits = lambda **kwargs: student_logits
    rows = completion_ids.shape[0]
    inputs = {"completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": advantages,
              "self_distillation_mask": sd_mask, "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 1, dtype=torch.long)}
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    loss = trl_sdpo.SDPOTrainer.compute_loss(trainer, trainer.model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


ROWS, SEQ, V = 4, 6, 11
CASES = [  # mode, alpha, topk, add_tail, distillation_weight, loss_type, importance_sampling_level
    ("sampled_token", 1.0, None, False, 1.0, "dapo", "token"),
    ("full_logits", 0.5, None, False, 0.5, "grpo", "token"),
    ("full_logits", 1.0, None, False, 0.0, "dr_grpo", "sequence"),
    ("topk_logits", 0.3, 4, True, 1.0, "dapo", "token"),
    ("topk_logits", 0.0, 4, False, 0.3, "bnpo", "sequence"),
]


@pytest.fixture(scope="module")
def fixed_inputs():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(ROWS, SEQ, V)).astype(np.float32) * 2
    teacher = rng.normal(size=(ROWS, SEQ, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, size=(ROWS, SEQ))
    mask = np.ones((ROWS, SEQ), np.float32)
    mask[0, 4:], mask[2, 2:] = 0, 0
    sd_mask = np.asarray([1, 0, 1, 1], np.float32)
    advantages = rng.normal(size=ROWS).astype(np.float32)
    logps = np.asarray(jax.nn.log_softmax(student))[np.arange(ROWS)[:, None], np.arange(SEQ)[None], ids]
    old = logps + rng.normal(size=(ROWS, SEQ)).astype(np.float32) * 0.5  # ratios on both sides of the clip
    return student, teacher, ids, mask, sd_mask, advantages, old


@pytest.mark.parametrize("with_old", [False, True], ids=["on-policy", "old-logps"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-a{c[1]}-w{c[4]}-{c[5]}-{c[6]}" for c in CASES])
def test_loss_gradient_and_metrics_match_trl(tmp_path, fixed_inputs, case, with_old):
    mode, alpha, topk, tail, weight, loss_type, level = case
    student, teacher, ids, mask, sd_mask, advantages, old = fixed_inputs
    args = trl_config(tmp_path, distillation_mode=mode, distillation_alpha=alpha, distillation_topk=topk,
                      distillation_add_tail=tail, distillation_weight=weight, loss_type=loss_type,
                      importance_sampling_level=level, max_completion_length=SEQ, epsilon_high=0.28)
    student_torch = torch.tensor(student, requires_grad=True)
    trl_loss, trl_metrics = trl_compute_loss(args, student_torch, torch.tensor(teacher), torch.tensor(ids),
                                             torch.tensor(mask), torch.tensor(sd_mask), torch.tensor(advantages),
                                             torch.tensor(old) if with_old else None)
    trl_loss.backward()

    def loss(student_logits):
        per_token, logps = sdpo.self_distillation_divergence(
            student_logits, jnp.asarray(teacher), jnp.asarray(ids), distillation_mode=mode, distillation_alpha=alpha,
            distillation_topk=topk, distillation_add_tail=tail)
        return sdpo.sdpo_loss(per_token, logps, jnp.asarray(old) if with_old else None, jnp.asarray(advantages),
                              jnp.asarray(mask), self_distillation_mask=jnp.asarray(sd_mask),
                              distillation_weight=weight, loss_type=loss_type, importance_sampling_level=level,
                              epsilon_high=0.28, max_completion_length=SEQ)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(student))
    np.testing.assert_allclose(float(value), trl_loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), student_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert set(metrics) == set(trl_metrics)
    for name, trl_value in trl_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), trl_value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(student_torch.grad.numpy()).max() > 1e-3  # the case does train something


def test_config_defaults_match_trl(tmp_path):
    ours = sdpo.SDPOConfig(output_dir=str(tmp_path))
    theirs = trl_config(tmp_path)
    shared = [f.name for f in dataclasses.fields(ours) if hasattr(theirs, f.name) and f.name not in (
        "output_dir", "report_to", "bf16", "num_generations", "per_device_train_batch_size", "logging_steps",
        "max_steps", "gradient_checkpointing", "save_steps", "seed", "lr_scheduler_type", "warmup_ratio",
        "learning_rate", "adam_epsilon", "run_name", "eval_steps", "warmup_steps", "dataloader_num_workers",
        "generation_batch_size", "steps_per_generation")]  # TRL resolves these two in __post_init__
    method_fields = [f.name for f in dataclasses.fields(sdpo.SDPOConfig) if f.name in sdpo.SDPOConfig.__annotations__]
    checked = [name for name in shared if name in method_fields]
    assert len(checked) > 25
    for name in checked:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs distillation_alpha=1.0"):
        sdpo.SDPOConfig(output_dir=str(tmp_path), distillation_alpha=0.5)
    with pytest.raises(ValueError, match="distillation_topk=None"):
        sdpo.SDPOConfig(output_dir=str(tmp_path), distillation_mode="topk_logits")
    with pytest.raises(ValueError, match="teacher_model_kind='frozen'"):
        sdpo.SDPOConfig(output_dir=str(tmp_path), teacher_model_kind="frozen")
    with pytest.raises(ValueError, match="distillation_weight=1.5"):
        sdpo.SDPOConfig(output_dir=str(tmp_path), distillation_weight=1.5)


def test_teacher_contexts_match_trl_builder(tmp_path):
    """A rollout of 2 groups x 3 with fixed rewards and feedback through TRL's context builder and ours: the same
    teacher prompts (as text), mask and `self_distillation/*` fractions."""
    options = dict(num_generations=3, include_environment_feedback=True,
                   environment_feedback_only_without_solution=True, success_reward_threshold=0.5)
    prompts = ["1+1=", "1+1=", "1+1=", "2+5=", "2+5=", "2+5="]
    completions = ["2", "3", "2<think>x</think>", "9", "8", "6"]
    rewards = np.asarray([1.0, 0.0, 0.7, 0.0, 0.0, 0.0], np.float32)
    feedbacks = ["", "off by one", None, "too big", "too big", None]
    args = trl_config(tmp_path, per_device_train_batch_size=6, **options, remove_thinking_from_demonstration=True)
    seen = []
    completion_ids = [TOKENIZER(c)["input_ids"] for c in completions]
    trainer = types.SimpleNamespace(
        args=args, num_generations=3, model=types.SimpleNamespace(training=True), processing_class=TOKENIZER,
        _tokenizer=TOKENIZER,
        accelerator=types.SimpleNamespace(device="cpu", process_index=0, gather=lambda x: x,
                                          pad_across_processes=lambda x, **kwargs: x),
        _tokenize_prompts_untruncated=lambda texts: seen.extend(texts) or [TOKENIZER(t)["input_ids"] for t in texts])
    padded = torch.tensor(data.pad_rows(completion_ids, 20, TOKENIZER.pad_token_id))
    output = {"completion_ids": padded, "completion_mask": (padded != TOKENIZER.pad_token_id).long()}
    builder = trl_sdpo.SuccessfulRolloutTeacherContextBuilder(trainer)
    built = builder.build(output, prompts, torch.tensor(rewards), feedbacks=feedbacks)

    config = sdpo.SDPOConfig(output_dir=str(tmp_path), **options, remove_thinking_from_demonstration=True)
    teacher_prompts, mask, metrics = sdpo.teacher_contexts(prompts, completions, rewards, feedbacks, config)
    assert teacher_prompts == seen
    np.testing.assert_array_equal(mask, built["self_distillation_mask"].numpy())
    assert mask.tolist() == [1, 1, 1, 1, 1, 0]  # row 0: row 2 shown (self excluded); row 3/4: feedback only
    assert metrics == pytest.approx(builder.last_metrics)


def test_from_hidden_matches_logits(fixed_inputs):
    """The chunked path (chunks of 5 tokens over 4 x 6) gives the logits path's per-token values and gradients."""
    rng = np.random.default_rng(1)
    hidden_s, hidden_t = (jnp.asarray(rng.normal(size=(ROWS, SEQ, 8)), jnp.float32) for _ in range(2))
    weight_s, weight_t = (jnp.asarray(rng.normal(size=(V, 8)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(fixed_inputs[2])
    options = dict(distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=3)

    def chunked(h, w):
        per_token, logps = sdpo.self_distillation_from_hidden(h, w, hidden_t, weight_t, ids, temperature=0.7,
                                                              chunk_size=5, **options)
        return jnp.sum(per_token) + jnp.sum(logps), (per_token, logps)

    def whole(h, w):
        per_token, logps = sdpo.self_distillation_divergence(h @ w.T / 0.7, hidden_t @ weight_t.T / 0.7, ids,
                                                             **options)
        return jnp.sum(per_token) + jnp.sum(logps), (per_token, logps)

    gradient = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (_, chunked_out), chunked_grads = gradient(chunked)(hidden_s, weight_s)
    (_, whole_out), whole_grads = gradient(whole)(hidden_s, weight_s)
    for a, b in zip(jax.tree.leaves((chunked_out, chunked_grads)), jax.tree.leaves((whole_out, whole_grads)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def has_digit(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def test_training_on_a_rollout_lowers_the_divergence_and_train_runs(tmp_path):
    """A custom loop: one rollout of the tiny model, five steps on it; the full-vocabulary reverse KL to the base
    teacher (which reads the demonstrations) falls. Then `train()` for two steps (EMA teacher, policy term on):
    TRL's metrics."""
    config = sdpo.SDPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                             max_completion_length=6, learning_rate=3e-3, distillation_mode="full_logits",
                             teacher_model_kind="base", success_reward_threshold=1.0, mesh_fsdp=1, max_steps=2,
                             logging_steps=1, save_steps=0, disable_tqdm=True, save_final_model=False,
                             max_reprompt_len=64, temperature=1.0)
    model = tiny_llama(VOCAB)
    tx, _ = make_optimizer(config, 10)
    state = TrainState.create(model, tx)
    prompts = data.prepare_prompts(datasets.Dataset.from_list([{"prompt": "3+4="}, {"prompt": "5+1="}]), TOKENIZER,
                                   method="SDPO")
    arrays, metrics, _ = sdpo.rollout(state, prompts, [has_digit], TOKENIZER, config, key=jax.random.key(0),
                                      mesh=None, prompt_buckets=[16])
    assert 0 < metrics["self_distillation/reprompt_sample_fraction"] <= 1
    batch = shard_batch({k: v[None] for k, v in arrays.items()}, None, batch_axis=1, global_batch=True)
    teacher = sdpo.teacher_params(state, sdpo.initial_teacher(state, "base"), "base")
    step = sdpo.make_train_step(config)
    losses = []
    for _ in range(5):
        state, step_metrics = step(state, batch, teacher)
        losses.append(float(step_metrics["loss"]))
    assert losses[0] > 0.01 and losses[-1] < 0.7 * losses[0], losses

    config = dataclasses.replace(config, distillation_mode="sampled_token", teacher_model_kind="ema",
                                 teacher_update_rate=0.5, distillation_weight=0.5)
    result = sdpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list([{"prompt": "3+4="}] * 4), config,
                        reward_funcs=[has_digit])
    record = result.metrics[-1]
    for name in ("loss", "grad_norm", "self_distillation/distillation_loss", "sdpo/distillation_loss",
                 "self_distillation/policy_loss", "self_distillation/reward_mean",
                 "self_distillation/rewards/has_digit", "self_distillation/success_group_fraction",
                 "completions/mean_length"):
        assert np.isfinite(record[name]), name
    assert result.state.step == 2


def test_accumulated_micro_batches_add_up_to_the_whole_batch(fixed_inputs):
    """With the step's rows and tokens as normalisers, the micro-batches' losses and metric pairs sum to the whole
    batch's (so `batch 4 x accumulation 1 == batch 1 x accumulation 4`), for sequence- and token-normalised terms."""
    student, teacher, ids, mask, sd_mask, advantages, old = fixed_inputs
    per_token, logps = sdpo.self_distillation_divergence(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(ids),
                                                         distillation_mode="full_logits")
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        options = dict(distillation_weight=0.4, loss_type=loss_type, max_completion_length=SEQ, return_counts=True)
        whole, whole_pairs = sdpo.sdpo_loss(per_token, logps, jnp.asarray(old), jnp.asarray(advantages),
                                            jnp.asarray(mask), self_distillation_mask=jnp.asarray(sd_mask), **options)
        parts = [sdpo.sdpo_loss(per_token[i:i + 1], logps[i:i + 1], jnp.asarray(old[i:i + 1]),
                                jnp.asarray(advantages[i:i + 1]), jnp.asarray(mask[i:i + 1]),
                                self_distillation_mask=jnp.asarray(sd_mask[i:i + 1]), num_sequences=ROWS,
                                num_tokens=mask.sum(), **options) for i in range(ROWS)]
        np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-5)
        for name, (total, count) in whole_pairs.items():
            summed = [sum(float(p[1][name][k]) for p in parts) for k in (0, 1)]
            np.testing.assert_allclose(summed, [float(total), float(count)], rtol=1e-5, err_msg=name)


def test_ema_teacher_update_matches_trl_sync():
    """`update_teacher` every `teacher_sync_steps` steps against TRL's `SyncTeacherModelCallback` arithmetic
    (`SyncRefModelCallback._sync_target_model`) on the same weights."""
    from trl.trainer.callbacks import SyncRefModelCallback

    config = types.SimpleNamespace(teacher_model_kind="ema", teacher_update_rate=0.05, teacher_sync_steps=2)
    rng = np.random.default_rng(2)
    teacher_w, policy_w = (rng.normal(size=(3, 2)).astype(np.float32) for _ in range(2))
    kept = {"w": jnp.asarray(teacher_w)}
    state = types.SimpleNamespace(params={"w": jnp.asarray(policy_w)})
    target, source = torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        target.weight.copy_(torch.tensor(teacher_w))
        source.weight.copy_(torch.tensor(policy_w))
    assert sdpo.update_teacher(kept, state, config, step=1) is kept  # not a sync step
    kept = sdpo.update_teacher(kept, state, config, step=2)
    SyncRefModelCallback._sync_target_model(source, target, config.teacher_update_rate)
    np.testing.assert_allclose(np.asarray(kept["w"]), target.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(kept["w"]), teacher_w)
