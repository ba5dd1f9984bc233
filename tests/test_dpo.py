"""DPO: data preparation, the jitted step (accumulation, mesh, reference handling), TRL parity and the loop."""

import json
import random
import shutil
import tempfile

import datasets
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpt import dpo
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return dpo.DPOConfig(**settings)


def preference_rows(count, *, seed=0):
    """`a+b=`: chosen the sum, rejected a wrong one (of varying length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([1, 2, 13]))})
    return rows


def decoded(example, side):
    ids, mask = example[f"{side}_input_ids"], example[f"{side}_completion_mask"]
    return TOKENIZER.decode(ids), mask.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_explicit_and_implicit_prompt_give_the_same_pairs(tmp_path):
    explicit = datasets.Dataset.from_list([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    implicit = datasets.Dataset.from_list([{"chosen": "2+2=4", "rejected": "2+2=5"}])
    for dataset in (explicit, implicit):
        (example,) = dpo.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
        assert decoded(example, "chosen") == ("2+2=4</s>", [0, 0, 0, 0, 1, 1])  # EOS on standard completions
        assert decoded(example, "rejected") == ("2+2=5</s>", [0, 0, 0, 0, 1, 1])


def test_conversational_pairs_use_the_chat_template(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    explicit = datasets.Dataset.from_list([{"prompt": prompt, "chosen": [{"role": "assistant", "content": "yo"}],
                                            "rejected": [{"role": "assistant", "content": "no!"}]}])
    implicit = datasets.Dataset.from_list([{"chosen": prompt + [{"role": "assistant", "content": "yo"}],
                                            "rejected": prompt + [{"role": "assistant", "content": "no!"}]}])
    for dataset in (explicit, implicit):
        (example,) = dpo.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
        # the generation prompt <|assistant|> belongs to the prompt
        assert decoded(example, "chosen") == ("<|user|>hi<|end|><|assistant|>yo<|end|>", [0] * 5 + [1] * 3)
        assert decoded(example, "rejected") == ("<|user|>hi<|end|><|assistant|>no!<|end|>", [0] * 5 + [1] * 4)


def test_truncation_keep_start_and_keep_end(tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": "abcd", "chosen": "efgh", "rejected": "e"}])
    (start,) = dpo.prepare_dataset(dataset, TOKENIZER, config(tmp_path, max_length=6))
    assert decoded(start, "chosen") == ("abcdef", [0, 0, 0, 0, 1, 1])
    assert decoded(start, "rejected") == ("abcde</s>", [0, 0, 0, 0, 1, 1])  # short enough: untouched
    (end,) = dpo.prepare_dataset(dataset, TOKENIZER, config(tmp_path, max_length=6, truncation_mode="keep_end"))
    assert decoded(end, "chosen") == ("defgh</s>", [0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("rows,overrides,message", [
    ([{"prompt": "x", "chosen": "a"}], {}, "DPO needs a preference .* look like prompt_only \\(prompt\\)"),
    ([{"prompt": "x", "completion": "a"}], {}, "DPO needs a preference .* look like prompt_completion"),
    ([{"question": "x"}], {}, "Cannot tell the dataset format"),
    ([{"prompt": "a" * 40, "chosen": "b", "rejected": "c"}], {},
     "Example 0: the prompt is 40 tokens, not shorter than max_length=32"),
])
def test_bad_data_fails_before_compiling(tmp_path, rows, overrides, message):
    with pytest.raises(ValueError, match=message):
        dpo.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path, **overrides))


def test_empty_dataset_and_missing_chat_template(tmp_path):
    with pytest.raises(ValueError, match="The DPO dataset is empty"):
        dpo.prepare_dataset(datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), TOKENIZER,
                            config(tmp_path))
    conversational = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                                  "chosen": [{"role": "assistant", "content": "a"}],
                                                  "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        dpo.prepare_dataset(conversational, char_tokenizer(chat_template=False), config(tmp_path))


@pytest.mark.parametrize("field,value,message", [
    ("loss_type", "bogus", "loss_type='bogus' is not a DPO loss"),
    ("loss_type", "exo_pair", "'exo_pair' needs 0 < label_smoothing < 1"),
    ("loss_weights", [1.0, 2.0], "loss_weights=\\[1.0, 2.0\\] has 2 weights for 1 loss types"),
    ("ld_alpha", 1.5, "ld_alpha=1.5 must be in \\[0, 1\\]"),
    ("truncation_mode", "keep_middle", "truncation_mode='keep_middle'"),
    ("f_divergence_type", "tv", "f_divergence_type='tv'"),
])
def test_config_validation_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **{field: value})


def test_config_takes_one_loss_name_or_a_list(tmp_path):
    assert config(tmp_path, loss_type="ipo").loss_type == ["ipo"]
    assert config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1]).loss_type == ["sigmoid", "sft"]
    assert dpo.DPOConfig().learning_rate == 1e-6 and dpo.DPOConfig().beta == 0.1


def test_collate_stacks_chosen_and_rejected_per_pair(tmp_path):
    examples = dpo.prepare_dataset(datasets.Dataset.from_list(preference_rows(8)), TOKENIZER, config(tmp_path))
    for i, e in enumerate(examples):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = np.float32(-i), np.float32(-2 * i)
    batch = dpo.collate(examples, accumulation_steps=2, buckets=[16, 32])
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (2, 4, 2, 16), "attention_mask": (2, 4, 2, 16), "completion_mask": (2, 4, 2, 16),
        "ref_chosen_logps": (2, 4), "ref_rejected_logps": (2, 4)}
    pair = examples[5]  # accumulation step 1, row 1
    n = len(pair["rejected_input_ids"])
    assert batch["input_ids"][1, 1, 1, :n].tolist() == pair["rejected_input_ids"].tolist()
    assert batch["attention_mask"][1, 1, 1].sum() == n and batch["ref_rejected_logps"][1, 1] == -10.0


# ---------------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------------

STEP_OPTIONS = dict(loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.5, 0.2], ld_alpha=0.5)


@pytest.fixture(scope="module")
def step_examples(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("dpo"), **STEP_OPTIONS)
    return dpo.prepare_dataset(datasets.Dataset.from_list(preference_rows(8)), TOKENIZER, cfg)


def _one_step(cfg, examples, accumulation, mesh=None, precomputed=False):
    """One step with SGD, so updated parameters compare gradients directly (Adam's first step is about
    lr * sign(g) and amplifies float noise in near-zero gradients). The reference is another model."""
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0), mesh=mesh)
    step = dpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    ref_model = tiny_llama(VOCAB, seed=1)
    if precomputed:
        examples = dpo.precompute_ref_logps(ref_model, examples, cfg, mesh=mesh, batch_size=3, buckets=[16, 32])
        ref_params = None
    else:
        ref_params = dpo.reference_params(state, ref_model, mesh)
    batch = dpo.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1), ref_params)
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, step_examples):
    """batch 8 x accumulation 1, reference params in the step, no mesh."""
    return _one_step(config(tmp_path_factory.mktemp("dpo"), **STEP_OPTIONS), step_examples, accumulation=1)


def assert_same_step(actual, expected, *, rtol=1e-5, atol=1e-6):
    (metrics, params), (expected_metrics, expected_params) = actual, expected
    assert set(metrics) == set(expected_metrics)
    for key in expected_metrics:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=rtol, abs=1e-6), key
    for name in expected_params:
        np.testing.assert_allclose(params[name], expected_params[name], atol=atol, err_msg=str(name))


def test_step_metrics_have_trl_names_and_learn(baseline):
    metrics, _ = baseline
    assert set(metrics) == {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
                            "entropy", "mean_token_accuracy"}
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
    assert metrics["rewards/chosen"] != 0.0  # the reference is another model


def test_accumulation_equals_one_big_batch(tmp_path, step_examples, baseline):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 (pairs and tokens differ per micro-batch): same
    loss, metrics and updated parameters, for sigmoid + ipo + sft with LD-DPO."""
    assert_same_step(_one_step(config(tmp_path, **STEP_OPTIONS), step_examples, accumulation=4), baseline)


def test_eight_device_mesh_equals_unsharded(tmp_path, step_examples, baseline):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert_same_step(_one_step(config(tmp_path, **STEP_OPTIONS), step_examples, accumulation=1, mesh=mesh),
                     baseline)


def test_precomputed_reference_equals_reference_in_the_step(tmp_path, step_examples, baseline):
    cfg = config(tmp_path, precompute_ref_log_probs=True, **STEP_OPTIONS)
    assert_same_step(_one_step(cfg, step_examples, accumulation=1, precomputed=True), baseline)


def test_reference_errors(tmp_path, step_examples):
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(1.0))
    with pytest.raises(ValueError, match="different architecture"):
        dpo.reference_params(state, tiny_llama(VOCAB, hidden_size=16))
    batch = dpo.collate(step_examples, accumulation_steps=1, buckets=[16, 32])
    with pytest.raises(ValueError, match="needs the reference log-probs in the batch"):
        dpo.make_train_step(config(tmp_path))(state, shard_batch(batch, None, batch_axis=1), None)
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        dpo.train(model, TOKENIZER, datasets.Dataset.from_list(preference_rows(8)), config(tmp_path),
                  ref_model=model)


def test_loss_and_metrics_match_trl(tmp_path):
    """TRL 1.16's DPOTrainer.compute_loss on the same model, reference and pairs (MPO-style loss with LD-DPO)."""
    import transformers
    import trl  # a test dependency: parity must fail, never skip, without it

    import jaxpt.models

    options = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.5,
                   max_length=12)
    policy_dir, ref_dir = tmp_path / "policy", tmp_path / "ref"
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, seed=0), policy_dir)
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, seed=1), ref_dir)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"] + "ab", "chosen": r["chosen"] * 3,
                                           "rejected": r["rejected"]} for r in preference_rows(6)])
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=transformers.AutoModelForCausalLM.from_pretrained(ref_dir),
        args=trl.DPOConfig(output_dir=tempfile.mkdtemp(dir=tmp_path), bf16=False, report_to="none",
                           use_cpu=True, gradient_checkpointing=False, **options),
        train_dataset=dataset, processing_class=TOKENIZER)
    features = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for i in range(len(dataset))]
    trainer.model.train()  # TRL files metrics under the model's mode
    trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(features)).detach())
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}

    cfg = config(tmp_path, **options)
    examples = dpo.prepare_dataset(dataset, TOKENIZER, cfg)
    state = TrainState.create(jaxpt.models.from_pretrained(policy_dir), optax.sgd(0.0))
    ref_params = dpo.reference_params(state, jaxpt.models.from_pretrained(ref_dir))
    batch = dpo.collate(examples, accumulation_steps=1, buckets=[16])
    metrics = jax.device_get(dpo.make_eval_step(cfg)(state, shard_batch(batch, None, batch_axis=1), ref_params))
    assert float(metrics["loss"]) == pytest.approx(trl_loss, rel=1e-5)
    assert len(trl_metrics) == 10
    for key, value in trl_metrics.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_raises_the_margin_and_writes_trl_metrics(tmp_path):
    rows = preference_rows(32)
    dataset = datasets.Dataset.from_list(rows)
    eval_dataset = datasets.Dataset.from_list(rows[:6])  # seen pairs (24 steps learn no arithmetic); 6: padded
    cfg = config(tmp_path, max_steps=24, logging_steps=4, eval_strategy="steps", eval_steps=12, beta=0.5,
                 learning_rate=3e-3)
    result = dpo.train(tiny_llama(VOCAB), TOKENIZER, dataset, cfg, eval_dataset=eval_dataset)
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "loss" in r]
    assert {"step", "epoch", "loss", "grad_norm", "learning_rate", "num_tokens", "rewards/chosen",
            "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"} <= set(train_records[0])
    first, last = train_records[0], train_records[-1]
    assert first["loss"] == pytest.approx(np.log(2), abs=0.1)  # the policy starts as its reference
    assert last["loss"] < 0.75 * first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"] + 0.4
    assert last["rewards/accuracies"] > 0.8
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"eval_rewards/margins", "eval_logits/chosen", "eval_mean_token_accuracy"} <= set(evals[0])
    assert int(result.state.step) == 24


# ---------------------------------------------------------------------------------------------------------------
# TR-DPO: reference synchronisation
# ---------------------------------------------------------------------------------------------------------------


def test_tr_dpo_reference_moves_toward_the_policy_every_sync_steps(tmp_path, monkeypatch):
    """sync_ref_model: the reference the step sees is the initial model until step 2, then
    0.6 * policy(after step 2) + 0.4 * reference, again after step 4 (float64 recomputation); the given ref_model
    is left untouched (the synced reference is a copy)."""
    real_make_train_step, seen = dpo.make_train_step, []

    def recording_make_train_step(*args, **kwargs):
        step = real_make_train_step(*args, **kwargs)

        def recording_step(state, batch, ref_params):
            reference = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(ref_params)}
            state, metrics = step(state, batch, ref_params)
            seen.append((reference, {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(state.params)}))
            return state, metrics

        return recording_step

    monkeypatch.setattr(dpo, "make_train_step", recording_make_train_step)
    ref_model = tiny_llama(VOCAB, seed=1)
    initial_ref = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(nnx.state(ref_model, nnx.Param))}
    cfg = config(tmp_path, max_steps=5, sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=2,
                 learning_rate=1e-2)
    dpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(preference_rows(20)), cfg, ref_model=ref_model)

    references = [reference for reference, _ in seen]
    policies = [policy for _, policy in seen]
    expected_2 = {k: 0.6 * policies[1][k] + 0.4 * initial_ref[k] for k in initial_ref}
    expected_4 = {k: 0.6 * policies[3][k] + 0.4 * expected_2[k] for k in initial_ref}
    for step, expected in enumerate([initial_ref, initial_ref, expected_2, expected_2, expected_4], start=1):
        for name in initial_ref:
            np.testing.assert_allclose(references[step - 1][name], expected[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"step {step} {name}")
    moved = max(np.abs(expected_2[k] - initial_ref[k]).max() for k in initial_ref)
    assert moved > 1e-2  # the update is visible, not a comparison of equal trees
    for name, value in nnx.to_flat_state(nnx.state(ref_model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(value, np.float64), initial_ref[name])


def test_tr_dpo_resumed_after_a_sync_continues_exactly(tmp_path):
    """A checkpoint after the step-2 synchronisation holds the synced reference: resuming from step 3 (the
    reference syncs again at step 4) ends with the uninterrupted run's parameters and logs its metrics."""
    rows = datasets.Dataset.from_list(preference_rows(20))
    cfg = config(tmp_path, max_steps=5, save_steps=3, sync_ref_model=True, ref_model_mixup_alpha=0.6,
                 ref_model_sync_steps=2, learning_rate=1e-2)
    full = dpo.train(tiny_llama(VOCAB), TOKENIZER, rows, cfg)
    full_params = {k: np.asarray(v) for k, v in nnx.to_flat_state(full.state.params)}
    full_records = [r for r in full.metrics if "loss" in r]
    # The same output_dir again from its step-3 checkpoint (the model given is the same initial one)
    resumed = dpo.train(tiny_llama(VOCAB), TOKENIZER, rows, cfg.replace(resume_from_checkpoint="latest"))
    resumed_records = [r for r in resumed.metrics if "loss" in r]
    assert [r["step"] for r in resumed_records] == [4, 5]
    for before, after in zip(full_records[3:], resumed_records, strict=True):
        for name in ("loss", "rewards/margins", "rewards/chosen"):
            assert after[name] == pytest.approx(before[name], rel=1e-5, abs=1e-7), (after["step"], name)
    for name, value in nnx.to_flat_state(resumed.state.params):
        np.testing.assert_allclose(np.asarray(value), full_params[name], rtol=1e-5, atol=1e-7, err_msg=str(name))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5]  # replayed steps logged once
    # A checkpoint after a sync without the reference (written without sync_ref_model) cannot resume exactly
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "extra")
    with pytest.raises(ValueError, match="resuming at step 3 with sync_ref_model=True needs the reference"):
        dpo.train(tiny_llama(VOCAB), TOKENIZER, rows, cfg.replace(resume_from_checkpoint="latest"))


def test_tr_dpo_bad_configurations_fail_early(tmp_path):
    with pytest.raises(ValueError, match="ref_model_mixup_alpha=1.5 must be in"):
        config(tmp_path, sync_ref_model=True, ref_model_mixup_alpha=1.5)
    with pytest.raises(ValueError, match="ref_model_sync_steps=0 must be >= 1"):
        config(tmp_path, sync_ref_model=True, ref_model_sync_steps=0)
    with pytest.raises(ValueError, match="cannot be combined with precompute_ref_log_probs=True"):
        config(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)
    from jaxpt import lora

    model = tiny_llama(VOCAB)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=2, lora_dropout=0.0))
    with pytest.raises(ValueError, match="not supported with LoRA"):
        dpo.train(model, TOKENIZER, datasets.Dataset.from_list(preference_rows(8)),
                  config(tmp_path, sync_ref_model=True))
