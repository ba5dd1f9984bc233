"""SFT: data preparation, the jitted step (accumulation, mesh, packing) and the training loop."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxpt import sft
from jaxpt.checkpoint import Checkpointer
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState, make_optimizer
from tests.helpers import arithmetic_texts, char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=3e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return sft.SFTConfig(**settings)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_language_modeling_text_gets_eos_and_full_loss(tmp_path):
    dataset = datasets.Dataset.from_list([{"text": "hello"}])
    (example,) = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert TOKENIZER.decode(example["input_ids"]) == "hello</s>"
    assert example["loss_mask"].tolist() == [1] * 6


def test_prompt_completion_masks_the_prompt(tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": "2+2=", "completion": "4"}])
    (example,) = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert TOKENIZER.decode(example["input_ids"]) == "2+2=4</s>"
    assert example["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1]
    (full,) = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path, completion_only_loss=False))
    assert full["loss_mask"].tolist() == [1] * 6


def test_conversational_prompt_completion_and_assistant_only_loss(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    completion = [{"role": "assistant", "content": "yo"}]
    dataset = datasets.Dataset.from_list([{"prompt": prompt, "completion": completion}])
    (example,) = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert TOKENIZER.decode(example["input_ids"]) == "<|user|>hi<|end|><|assistant|>yo<|end|>"
    assert example["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # the generation prompt is part of the prompt

    messages = datasets.Dataset.from_list([{"messages": prompt + completion + prompt + completion}])
    (full,) = sft.prepare_dataset(messages, TOKENIZER, config(tmp_path))
    assert full["loss_mask"].sum() == len(full["input_ids"])
    (assistant,) = sft.prepare_dataset(messages, TOKENIZER, config(tmp_path, assistant_only_loss=True))
    assert assistant["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1] * 2


def test_truncation_keeps_the_start(tmp_path):
    dataset = datasets.Dataset.from_list([{"text": "abcdefghij"}])
    (example,) = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path, max_length=4))
    assert TOKENIZER.decode(example["input_ids"]) == "abcd"


@pytest.mark.parametrize("rows,overrides,message", [
    ([{"question": "x"}], {}, "Cannot tell the dataset format"),
    ([{"prompt": "x", "chosen": "a", "rejected": "b"}], {}, "SFT needs a language_modeling .* look like preference"),
    ([{"prompt": "a" * 40, "completion": "b"}], {}, "the prompt is 40 tokens, not shorter than max_length=32"),
    ([{"text": "abc"}], {"completion_only_loss": True}, "completion_only_loss=True needs a prompt-completion"),
    ([{"text": "abc"}], {"assistant_only_loss": True}, "assistant_only_loss=True needs conversational"),
])
def test_bad_data_fails_before_compiling(tmp_path, rows, overrides, message):
    with pytest.raises(ValueError, match=message):
        sft.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path, **overrides))


def test_empty_dataset_and_missing_chat_template(tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        sft.prepare_dataset(datasets.Dataset.from_dict({"text": []}), TOKENIZER, config(tmp_path))
    conversational = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        sft.prepare_dataset(conversational, char_tokenizer(chat_template=False), config(tmp_path))


@pytest.mark.parametrize("field,value,message", [
    ("loss_type", "bogus", "loss_type='bogus' is not an SFT loss"),
    ("packing_strategy", "zigzag", "packing_strategy='zigzag'"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps=0 must be >= 1"),
    ("lr_scheduler_type", "exotic", "lr_scheduler_type='exotic'"),
])
def test_config_validation_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **{field: value})


def test_packing_bfd_fills_rows_without_crossing(tmp_path):
    texts = ["a" * 9, "b" * 5, "c" * 3, "d" * 2]  # + EOS each: 10, 6, 4, 3 tokens
    dataset = datasets.Dataset.from_list([{"text": t} for t in texts])
    packed = sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path, packing=True, max_length=13))
    assert len(packed) == 2
    for row in packed:
        assert row["input_ids"].shape == (13,)
    lengths = sorted(int((row["segment_ids"] > 0).sum()) for row in packed)
    assert lengths == [10, 13]  # {10}+{3} and {6}+{4}+{3}... best fit: 10+3=13, 6+4=10
    assert sorted(len(set(row["segment_ids"][row["segment_ids"] > 0].tolist())) for row in packed) == [2, 2]


# ---------------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------------


def _examples(tmp_path, count=8, **overrides):
    dataset = datasets.Dataset.from_list(arithmetic_texts(count))
    return sft.prepare_dataset(dataset, TOKENIZER, config(tmp_path, **overrides))


def _one_step(cfg, examples, accumulation, mesh=None, seed=0):
    """One step with SGD, so updated parameters compare gradients directly (Adam's first step is about
    lr * sign(g) and amplifies float noise in near-zero gradients)."""
    model = tiny_llama(VOCAB, seed=seed)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    step = sft.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    batch = sft.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_accumulation_equals_one_big_batch(tmp_path, loss_type):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4: same loss, metrics and updated parameters."""
    cfg = config(tmp_path, loss_type=loss_type)
    examples = _examples(tmp_path, completion_only_loss=False)
    examples[3]["loss_mask"][:] = 0  # uneven token counts per micro-batch make the normalisation matter
    metrics_1, params_1 = _one_step(cfg, examples, accumulation=1)
    metrics_4, params_4 = _one_step(cfg, examples, accumulation=4)
    for key in ("loss", "entropy", "mean_token_accuracy", "grad_norm"):
        assert metrics_4[key] == pytest.approx(metrics_1[key], rel=1e-5), key
    for name in params_1:
        np.testing.assert_allclose(params_4[name], params_1[name], atol=1e-6, err_msg=str(name))


def test_eight_device_mesh_equals_unsharded(tmp_path):
    cfg = config(tmp_path)
    examples = _examples(tmp_path)
    metrics, params = _one_step(cfg, examples, accumulation=1)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    mesh_metrics, mesh_params = _one_step(cfg, examples, accumulation=1, mesh=mesh)
    assert mesh_metrics["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    for name in params:
        np.testing.assert_allclose(mesh_params[name], params[name], atol=1e-6, err_msg=str(name))


def test_packed_rows_give_each_sequence_its_unpacked_loss(tmp_path):
    """Per-sequence losses of a packed row equal those of the same sequences padded one per row."""
    examples = _examples(tmp_path, count=4, completion_only_loss=False)
    packed = sft.pack_examples(examples, 32)
    assert len(packed) == 1 and packed[0]["segment_ids"].max() == 4
    cfg = config(tmp_path)
    model = tiny_llama(VOCAB)
    graphdef, params = nnx.split(model, nnx.Param)

    def per_token_nll(batch):
        micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
        targets, target_mask = sft._targets(micro)
        logits = nnx.merge(graphdef, params)(micro["input_ids"], **sft._model_inputs(micro))
        logp = jax.nn.log_softmax(logits)[..., None]
        nll = -jnp.take_along_axis(logp[..., 0], targets[..., None], -1)[..., 0]
        return np.asarray(nll * target_mask), np.asarray(target_mask)

    padded_nll, padded_mask = per_token_nll(sft.collate(examples, accumulation_steps=1, buckets=[32]))
    packed_nll, packed_mask = per_token_nll(sft.collate(packed, accumulation_steps=1, buckets=[32]))
    segments = packed[0]["segment_ids"]
    matched = set()
    for segment in range(1, 5):
        tokens = packed[0]["input_ids"][segments == segment].tolist()
        i = next(j for j, e in enumerate(examples) if e["input_ids"].tolist() == tokens and j not in matched)
        matched.add(i)
        n = len(tokens)
        # the last token of a segment predicts nothing (it would predict the next segment's first token)
        assert packed_mask[0][segments == segment].sum() == padded_mask[i].sum() == n - 1
        np.testing.assert_allclose(packed_nll[0][segments == segment][:n - 1], padded_nll[i][:n - 1], atol=1e-5)
    assert matched == {0, 1, 2, 3}
    del cfg


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_lowers_loss_writes_trl_metrics_and_exports(tmp_path):
    dataset = datasets.Dataset.from_list(arithmetic_texts(64))
    eval_dataset = datasets.Dataset.from_list(arithmetic_texts(8, seed=1))
    cfg = config(tmp_path, max_steps=30, logging_steps=5, save_final_model=True, eval_strategy="steps",
                 eval_steps=15, completion_only_loss=False)
    result = sft.train(tiny_llama(VOCAB), TOKENIZER, dataset, cfg, eval_dataset=eval_dataset)
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "loss" in r]
    assert {"step", "loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens",
            "epoch"} <= set(train_records[0])
    assert train_records[-1]["loss"] < 0.7 * train_records[0]["loss"]
    assert train_records[-1]["num_tokens"] > train_records[0]["num_tokens"]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # The export loads in transformers and gives jaxpt's logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = np.asarray([TOKENIZER("3+4=")["input_ids"]])
    import torch

    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(result.state.model()(ids), expected, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(result.model_dir)("3+4=")["input_ids"] == ids[0].tolist()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    dataset = datasets.Dataset.from_list(arithmetic_texts(32))
    full = config(tmp_path / "full", max_steps=6)
    sft.train(tiny_llama(VOCAB), TOKENIZER, dataset, full)

    # The same run, killed while preparing step 5 (after the checkpoint at step 3) ...
    interrupted = config(tmp_path / "resumed", max_steps=6, save_steps=3)
    real_collate, calls = sft.collate, []

    def crashing_collate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(sft, "collate", crashing_collate)
    with pytest.raises(KeyboardInterrupt):
        sft.train(tiny_llama(VOCAB), TOKENIZER, dataset, interrupted)
    monkeypatch.setattr(sft, "collate", real_collate)
    assert (tmp_path / "resumed" / "checkpoints" / "3").is_dir()
    # ... then resumed (from a differently initialised model: everything must come from the checkpoint).
    sft.train(tiny_llama(VOCAB, seed=123), TOKENIZER, dataset, interrupted.replace(resume_from_checkpoint="latest"))
    expected = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]  # step 4 ran, was lost, ran again and is logged once
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in expected], rel=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    dataset = datasets.Dataset.from_list(arithmetic_texts(32))
    # Warm-up: the first update uses lr 0; the second (lr 2.5e29) blows the parameters up, so the loss of
    # step 3 is not finite. The checkpoint of step 2 is kept; no later one is written.
    cfg = config(tmp_path, max_steps=8, save_steps=2, learning_rate=1e30, max_grad_norm=0.0, warmup_steps=4,
                 lr_scheduler_type="constant_with_warmup")
    with pytest.raises(FloatingPointError, match="at step 3"):
        sft.train(tiny_llama(VOCAB), TOKENIZER, dataset, cfg)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [2]
    like = TrainState.create(tiny_llama(VOCAB), make_optimizer(cfg, 8)[0])
    params = Checkpointer(tmp_path).restore(2, like)[0].params
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))


def test_load_dataset_files_directories_and_splits(tmp_path):
    from jaxpt import data

    rows = arithmetic_texts(6)
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(data.load_dataset(tmp_path / "one.jsonl")) == 6
    with pytest.raises(ValueError, match="only a 'train' split, not 'test'"):
        data.load_dataset(tmp_path / "one.jsonl", split="test")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (splits / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    assert len(data.load_dataset(splits, split="test")) == 2
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert data.load_dataset(tmp_path / "saved")[0] == rows[0]
    with pytest.raises(FileNotFoundError, match="No dataset file or directory"):
        data.load_dataset("./missing.jsonl")


# Tokens + EOS: 46 (longer than max_length 16), 6, 3, 11 and 4.
PACKING_TEXTS = ["abcdefghij" * 4 + "klmno", "short", "hi", "0123456789", "xyz"]


@pytest.mark.parametrize("options", [dict(packing=True, packing_strategy="bfd"),
                                     dict(packing=True, packing_strategy="bfd_split"),
                                     dict(padding_free=True, packing_strategy="wrapped")],
                         ids=["bfd", "bfd_split", "padding_free-wrapped"])
def test_train_packs_train_and_eval_sets_with_the_strategy_as_trl(tmp_path, monkeypatch, options):
    """Through `train()`: the training and the eval set are packed with the configured strategy, into TRL's rows
    (`trl.pack_dataset` on the same token ids): bfd truncates the long example like TRL, bfd_split and wrapped
    keep every token, and one epoch trains on every token of the packed rows."""
    from trl.data_utils import pack_dataset

    real_prepare, prepared = sft.prepare_dataset, []

    def recording_prepare(*args, **kwargs):
        prepared.append(real_prepare(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(sft, "prepare_dataset", recording_prepare)
    # A constant learning rate: the compiled step does not depend on the number of steps (3 packed rows with bfd,
    # 5 with the others), so the three strategies' runs share one compiled train step.
    cfg = config(tmp_path, max_length=16, per_device_train_batch_size=1, per_device_eval_batch_size=2, max_steps=-1,
                 num_train_epochs=1, eval_strategy="epoch", lr_scheduler_type="constant", **options)
    train_texts, eval_texts = PACKING_TEXTS, PACKING_TEXTS[::-1]
    sft.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list([{"text": t} for t in train_texts]), cfg,
              eval_dataset=datasets.Dataset.from_list([{"text": t} for t in eval_texts]))
    assert len(prepared) == 2
    kept = []
    for texts, rows in zip((train_texts, eval_texts), prepared, strict=True):
        token_ids = [TOKENIZER(text + "</s>")["input_ids"] for text in texts]
        expected = pack_dataset(datasets.Dataset.from_dict({"input_ids": token_ids}), 16, cfg.packing_strategy)
        assert all(row["input_ids"].shape == row["segment_ids"].shape == (16,) for row in rows)
        assert [row["input_ids"][row["segment_ids"] > 0].tolist() for row in rows] == expected["input_ids"]
        if cfg.packing_strategy != "wrapped":  # TRL's wrapped rows have no sequence boundaries
            assert [np.bincount(row["segment_ids"])[1:].tolist() for row in rows] == expected["seq_lengths"]
        kept.append(sum(int((row["segment_ids"] > 0).sum()) for row in rows))
        assert kept[-1] == (16 + 6 + 3 + 11 + 4 if cfg.packing_strategy == "bfd" else 46 + 6 + 3 + 11 + 4)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "eval_loss" in r] == [len(prepared[0])]
    assert [r for r in records if "loss" in r][-1]["num_tokens"] == kept[0]  # one epoch over every packed token
