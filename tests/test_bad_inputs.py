"""The bad-input catalogue: every invalid input fails before anything compiles, with a `ValueError` (or
`FileNotFoundError` / `NotADirectoryError`) whose message names the field, the value and the fix.

Each case asserts the exception type and a message fragment that names the field (or file, row, column, function).
Cases that go through `train()` patch the method's `make_optimizer` to fail loudly, which proves the check ran before
the optimizer, the state and any compiled step exist; they pass abstract models (`nnx.eval_shape`: the structure and
config without arrays), which is all those checks may look at.
"""

import json
import logging
import math
import time

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

import jaxpt.models
import jaxpt.rollout
from jaxpt import cli, config, data, dpo, grpo, kto, loop, reward, rewards, rloo, sft
from jaxpt.checkpoint import Checkpointer
from jaxpt.models import safetensors_io
from jaxpt.sharding import path_name
from tests.helpers import arithmetic_texts, char_tokenizer, marker_preferences, tiny_llama, tiny_llama_config


def abstract_llama(vocab_size, **overrides):
    """A tiny Llama without arrays (no initialisation, nothing compiled)."""
    return nnx.eval_shape(lambda: tiny_llama(vocab_size, **overrides))


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return abstract_llama(len(tokenizer))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, model):
    """A Hugging Face checkpoint directory (config, random safetensors weights, tokenizer) written without building
    the model."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer.save_pretrained(directory)
    tiny_llama_config(len(tokenizer)).save_pretrained(directory)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    num_layers = model.config.num_hidden_layers
    tensors = {}
    for path, leaf in params:
        names = jaxpt.models.hf_tensor_names(path_name(path), num_layers)  # a stacked parameter: one per layer
        shape = leaf.shape[1:] if len(names) > 1 else leaf.shape
        tensors.update({name: (0.05 * rng.standard_normal(shape)).astype(np.float32) for name in names})
    safetensors_io.save_checkpoint(tensors, directory)
    return directory


@pytest.fixture
def no_compile(monkeypatch):
    """Make reaching the optimizer (and so the state, the jitted step, any compile) an error in every method."""

    def reached(*args, **kwargs):
        raise AssertionError("the check should have failed before the optimizer was built")

    for module in (sft, dpo, reward, kto, grpo, rloo):
        monkeypatch.setattr(module, "make_optimizer", reached)


def rows(*items):
    return datasets.Dataset.from_list(list(items))


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


SMALL = dict(max_steps=1, mesh_fsdp=1, per_device_train_batch_size=1, disable_tqdm=True, save_final_model=False)


# --------------------------------------------------------------------------------------------------------------
# Configs: types and ranges (each at construction)
# --------------------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    (sft.SFTConfig, dict(learning_rate="3e-4x"), r"learning_rate='3e-4x' \(str\) must be a number"),
    (sft.SFTConfig, dict(max_steps=1.5), r"max_steps=1.5 \(float\) must be an int"),
    (sft.SFTConfig, dict(packing=1), r"packing=1 \(int\) must be a bool"),
    (sft.SFTConfig, dict(max_length="16"), r"max_length='16' \(str\) must be an int or None"),
    (sft.SFTConfig, dict(output_dir=3), r"output_dir=3 \(int\) must be a string"),
    (sft.SFTConfig, dict(output_dir=" "), r"output_dir is empty"),
    (sft.SFTConfig, dict(learning_rate=-1e-3), r"learning_rate=-0.001 must be >= 0"),
    (sft.SFTConfig, dict(max_grad_norm=-1.0), r"max_grad_norm=-1.0 must be >= 0 \(0 disables gradient clipping\)"),
    (sft.SFTConfig, dict(weight_decay=-0.1), r"weight_decay=-0.1 must be >= 0"),
    (sft.SFTConfig, dict(warmup_steps=-5), r"warmup_steps=-5 must be >= 0"),
    (sft.SFTConfig, dict(adam_beta1=1.0), r"adam_beta1=1.0 must be in \[0, 1\)"),
    (sft.SFTConfig, dict(adam_epsilon=-1e-8), r"adam_epsilon=-1e-08 must be >= 0"),
    (sft.SFTConfig, dict(warmup_ratio=1.5), r"warmup_ratio=1.5 must be in \[0, 1\)"),
    (sft.SFTConfig, dict(per_device_train_batch_size=0), r"per_device_train_batch_size=0 must be >= 1"),
    (sft.SFTConfig, dict(eval_steps=0), r"eval_steps=0 must be >= 1"),
    (sft.SFTConfig, dict(lr_scheduler_type="cosine_annealing"), r"lr_scheduler_type='cosine_annealing'"),
    (sft.SFTConfig, dict(eval_strategy="sometimes"), r"eval_strategy='sometimes'"),
    (sft.SFTConfig, dict(max_length=0), r"max_length=0 must be >= 2"),
    (sft.SFTConfig, dict(loss_type="mse"), r"loss_type='mse' is not an SFT loss"),
    (sft.SFTConfig, dict(report_to="tensorbord"), r"report_to='tensorbord': unknown tracker 'tensorbord'.*"
                                                  r"\['all', 'none', 'tensorboard', 'wandb'\]"),
    (sft.SFTConfig, dict(report_to=["none", "wandb"]), r"report_to=\['none', 'wandb'\]: 'none' and 'all' stand alone"),
    (sft.SFTConfig, dict(report_to=[3]), r"report_to=\[3\] \(list\) must be a list of str or a string"),
    (dpo.DPOConfig, dict(beta=-0.1), r"beta=-0.1 must be > 0"),
    (dpo.DPOConfig, dict(beta=0.0), r"beta=0.0 must be > 0"),
    (dpo.DPOConfig, dict(loss_type=["sigmoid", "sigmiod"]), r"sigmiod"),
    (kto.KTOConfig, dict(beta=-0.1), r"beta=-0.1 must be > 0"),
    (kto.KTOConfig, dict(desirable_weight=-1.0), r"desirable_weight=-1.0 must be >= 0"),
    (grpo.GRPOConfig, dict(beta=-0.04), r"beta=-0.04 must be >= 0"),
    (grpo.GRPOConfig, dict(max_prompt_length=0), r"max_prompt_length=0 must be >= 1"),
    (grpo.GRPOConfig, dict(epsilon=-0.2), r"epsilon=-0.2 .* must be >= 0"),
    (grpo.GRPOConfig, dict(num_generations=1), r"num_generations=1"),
    (rloo.RLOOConfig, dict(beta=-0.05), r"beta=-0.05 must be >= 0"),
    (rloo.RLOOConfig, dict(max_prompt_length=0), r"max_prompt_length=0 must be >= 1"),
    (rloo.RLOOConfig, dict(reward_clip_range=[1.0]), r"reward_clip_range=\[1.0\] must be \[low, high\]"),
    (reward.RewardConfig, dict(center_rewards_coefficient=-0.01), r"center_rewards_coefficient=-0.01 must be >= 0"),
]


@pytest.mark.parametrize("config_class, fields, message", CONFIG_CASES,
                         ids=[f"{c.__name__}-{next(iter(f))}-{i}" for i, (c, f, _) in enumerate(CONFIG_CASES)])
def test_bad_config_field(config_class, fields, message):
    with pytest.raises(ValueError, match=message):
        config_class(**fields)


def test_tracker_that_is_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(config, "tracker_installed", lambda name: name == "tensorboard")
    with pytest.raises(ValueError, match=r"report_to=\['tensorboard', 'wandb'\]: wandb needs the 'wandb' package.*"
                                         r'pip install -e "\.\[tracking\]"'):
        sft.SFTConfig(report_to=["tensorboard", "wandb"])


def test_report_to_accepts_hf_list_comma_string_all_and_none(monkeypatch):
    monkeypatch.setattr(config, "tracker_installed", lambda name: name == "tensorboard")
    assert sft.SFTConfig(report_to=["tensorboard"]).report_to == ["tensorboard"]
    assert sft.SFTConfig(report_to="tensorboard, tensorboard").report_to == ["tensorboard"]
    assert sft.SFTConfig(report_to="all").report_to == ["tensorboard"]  # every installed tracker, like transformers
    assert sft.SFTConfig(report_to="none").report_to == []
    assert sft.SFTConfig(report_to=None).report_to == []
    monkeypatch.setattr(config, "tracker_installed", lambda name: True)
    assert sft.SFTConfig(report_to="wandb,tensorboard").report_to == ["wandb", "tensorboard"]
    assert sft.SFTConfig(report_to="all").report_to == ["tensorboard", "wandb"]


def test_config_changed_after_construction_is_validated_again(model, tokenizer, tmp_path, no_compile):
    settings = sft.SFTConfig(output_dir=str(tmp_path / "out"), **SMALL)
    settings.learning_rate = -1.0
    with pytest.raises(ValueError, match=r"learning_rate=-1.0 must be >= 0"):
        sft.train(model, tokenizer, rows(*arithmetic_texts(4)), settings)
    settings = dpo.DPOConfig(output_dir=str(tmp_path / "out"), **SMALL)
    settings.beta = -0.5
    with pytest.raises(ValueError, match=r"beta=-0.5 must be > 0"):
        dpo.train(model, tokenizer, rows({"prompt": "a", "chosen": "b", "rejected": "c"}), settings)


# --------------------------------------------------------------------------------------------------------------
# output_dir
# --------------------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output_dir='.*taken' is a file"):
        config.check_output_dir(tmp_path / "taken")


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output_dir='.*taken/run' cannot be created: .*taken is a file"):
        config.check_output_dir(tmp_path / "taken" / "run")


def test_output_dir_not_writable(tmp_path, monkeypatch):
    # the tests may run as root, which may write anywhere: ask os.access what a normal user would get
    monkeypatch.setattr(config.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"output_dir='.*new/run' is not writable \(its nearest existing parent"):
        config.check_output_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # the check creates nothing


@pytest.mark.parametrize("method", ["sft", "dpo", "reward", "kto", "grpo", "rloo"])
def test_train_refuses_a_file_as_output_dir(method, model, tokenizer, tmp_path, no_compile):
    (tmp_path / "taken").write_text("x")
    module = {"sft": sft, "dpo": dpo, "reward": reward, "kto": kto, "grpo": grpo, "rloo": rloo}[method]
    config_class = {"sft": sft.SFTConfig, "dpo": dpo.DPOConfig, "reward": reward.RewardConfig,
                    "kto": kto.KTOConfig, "grpo": grpo.GRPOConfig, "rloo": rloo.RLOOConfig}[method]
    settings = config_class(output_dir=str(tmp_path / "taken"), **SMALL)
    dataset = rows({"prompt": "1+1=", "completion": "2", "label": True})
    extra = {"reward_funcs": [rewards.think_format_reward]} if method in ("grpo", "rloo") else {}
    the_model = abstract_llama(len(tokenizer), num_labels=1) if method == "reward" else model
    with pytest.raises(NotADirectoryError, match="output_dir="):
        module.train(the_model, tokenizer, dataset, settings, **extra)


# --------------------------------------------------------------------------------------------------------------
# Datasets: rows and columns (checked before tokenizing)
# --------------------------------------------------------------------------------------------------------------

def user(content="hi", **extra):
    return {"role": "user", "content": content, **extra}


def assistant(content="ok"):
    return {"role": "assistant", "content": content}


DATASET_CASES = [
    ("sft", [{"messages": [{"role": "bot", "content": "hi"}, assistant()]}],
     r"row 0, column 'messages', message 0 has role='bot'"),
    ("sft", [{"messages": [user(), assistant()]}, {"messages": [{"role": "user", "text": "hi"}, assistant()]}],
     r"row 1, column 'messages', message 0 has a 'text' key instead of 'content'"),
    ("sft", [{"messages": [user(), {"role": "assistant"}]}], r"row 0, column 'messages', message 1 .* no 'content'"),
    ("sft", [{"messages": [user(), {"content": "x"}]}], r"row 0, column 'messages', message 1 has no 'role'"),
    ("sft", [{"messages": [user(content=7), {"role": "assistant", "content": 8}]}],
     r"message 0 has content of type int"),
    ("sft", [{"prompt": "1+1=", "completion": 2}], r"row 0, column 'completion' is int 2; a standard \(strings\)"),
    ("sft", [{"prompt": "1+1=", "completion": "2"}, {"prompt": [user()], "completion": "2"}],  # a JSON file
     r"row 1, column 'prompt' holds messages, but the dataset is standard"),
    ("sft", [{"prompt": [user()], "completion": "2"}], r"row 0, column 'completion' is a string, but the dataset is "
                                                       r"conversational"),
    ("sft", [{"text": ""}, {"text": ""}], r"'text' column is an empty string in every row"),
    ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
     r"row 1, column 'completion' is null"),
    ("sft", [{"messages": [user(), assistant()]}, {"messages": "hello"}],  # a JSON file
     r"row 1, column 'messages' is a string, but the dataset is conversational"),
    ("dpo", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, r"Every one of the 3 pairs .* identical chosen"),
    ("dpo", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}],
     r"row 1, column 'rejected' is null"),
    ("dpo", [{"prompt": "p", "chosen": None, "rejected": "b"}], r"'chosen' column is null in every row"),
    ("dpo", [{"prompt": "p", "chosen": 1, "rejected": 0}], r"row 0, column 'chosen' is int 1"),
    ("reward", [{"chosen": "ab", "rejected": "ab"}] * 2, r"Every one of the 2 pairs .* identical chosen"),
    ("reward", [{"chosen": "a", "rejected": "b", "margin": None}] * 2, r"'margin' column is null in every row"),
    ("reward", [{"chosen": "a", "rejected": "b", "margin": "high"}], r"row 0: margin='high'; it must be a finite "),
    ("reward", [{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "a", "rejected": "c",
                                                                  "margin": float("inf")}],
     r"row 1: margin=inf; it must be a finite number"),
    ("reward", [{"chosen": "", "rejected": ""}] * 2, r"'chosen' column is an empty string in every row"),
    ("kto", [{"prompt": "p", "completion": "a", "label": None}] * 2, r"'label' column is null in every row"),
    ("kto", [{"prompt": "p", "completion": "a", "label": "yes"}], r"row 0: label='yes'; KTO labels are booleans"),
    ("kto", [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 2, r"identical chosen and rejected"),
    ("grpo", [{"prompt": 12}], r"row 0, column 'prompt' is int 12"),
    ("grpo", [{"prompt": [{"role": "narrator", "content": "x"}]}], r"message 0 has role='narrator'"),
    ("sft", [{"question": "q", "answer": "a"}], r"Cannot tell the dataset format from its columns"),
    ("dpo", [{"prompt": "p", "completion": "c"}], r"DPO needs a preference"),
]


def prepare(method, dataset, tokenizer):
    if method == "sft":
        return sft.prepare_dataset(dataset, tokenizer, sft.SFTConfig())
    if method == "dpo":
        return dpo.prepare_dataset(dataset, tokenizer, dpo.DPOConfig())
    if method == "reward":
        return reward.prepare_dataset(dataset, tokenizer, reward.RewardConfig())
    if method == "kto":
        return kto.prepare_dataset(dataset, tokenizer, kto.KTOConfig())
    return data.prepare_prompts(dataset, tokenizer, method="GRPO")


@pytest.mark.parametrize("method, items, message", DATASET_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(DATASET_CASES)])
def test_bad_dataset_rows(method, items, message, tokenizer, tmp_path):
    try:
        dataset = rows(*items)
    except (TypeError, ValueError):  # Arrow cannot hold mixed types in memory; the JSON loader can (a Json column)
        dataset = data.load_dataset(write_jsonl(tmp_path / "mixed.jsonl", items))
    with pytest.raises(ValueError, match=message):
        prepare(method, dataset, tokenizer)


def test_role_named_by_the_chat_template_is_accepted(tokenizer):
    template = tokenizer.chat_template + "{# the 'ipython' role is rendered like any other #}"
    custom = char_tokenizer()
    custom.chat_template = template
    dataset = rows({"messages": [{"role": "ipython", "content": "1"}, assistant("2")]})
    assert len(sft.prepare_dataset(dataset, custom, sft.SFTConfig())) == 1
    with pytest.raises(ValueError, match="role='ipython'"):
        sft.prepare_dataset(dataset, tokenizer, sft.SFTConfig())


def test_some_identical_pairs_warn_as_trl_trains_on_them(tokenizer, caplog):
    dataset = rows({"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"})
    with caplog.at_level(logging.WARNING, logger="jaxpt"):
        examples = dpo.prepare_dataset(dataset, tokenizer, dpo.DPOConfig())
    assert len(examples) == 2
    assert "1 of 2 pairs of the DPO dataset have identical chosen and rejected" in caplog.text


def test_sft_rows_with_no_trainable_token(tokenizer):
    with pytest.raises(ValueError, match=r"None of the 2 SFT examples has a token to train on"):
        sft.prepare_dataset(rows({"text": "</s>"}, {"text": "</s>"}), tokenizer, sft.SFTConfig())


# --------------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------------

FILE_CASES = [
    ("empty.jsonl", "", ValueError, r"The data file .*empty.jsonl is empty"),
    ("blank.jsonl", "\n\n", ValueError, r"The data file .*blank.jsonl is empty"),
    ("header.csv", "prompt,completion\n", ValueError, r"The CSV file .*header.csv holds a header but no rows"),
    ("broken.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', ValueError,
     r"broken.jsonl, line 2: malformed JSON"),
    ("list_row.jsonl", '{"text": "a"}\n["b"]\n', ValueError,
     r"list_row.jsonl, line 2: a JSON-lines row must be an object"),
]


@pytest.mark.parametrize("name, content, error, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_data_file(name, content, error, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        data.load_dataset(tmp_path / name)


@pytest.mark.parametrize("name", ["data/train/missing.jsonl", "missing.jsonl", "./missing", "~/no/such/dataset",
                                  "data\\missing"])
def test_missing_local_looking_dataset_fails_at_once(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"No dataset file or directory at .*dataset_name="):
        data.load_dataset(name)
    assert time.perf_counter() - started < 5  # no Hub round trips


def test_missing_split_of_a_saved_dataset(tmp_path):
    datasets.DatasetDict({"train": rows({"text": "a"})}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"has the splits \['train'\], not 'test'"):
        data.load_dataset(tmp_path / "saved", split="test")


# --------------------------------------------------------------------------------------------------------------
# Models and tokenizers
# --------------------------------------------------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in model_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: its header describes \d+ bytes"):
        jaxpt.models.from_pretrained(broken)


def test_safetensors_file_cut_inside_the_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or not a safetensors file"):
        safetensors_io.SafetensorsReader(tmp_path)


@pytest.mark.parametrize("name", ["./no_model", "runs/exp/final", "model.safetensors"])
def test_missing_local_looking_model_fails_at_once(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"No model directory at .*model_name_or_path="):
        jaxpt.models.from_pretrained(name)
    assert time.perf_counter() - started < 5


def test_model_path_that_is_a_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json is a file; from_pretrained needs a directory"):
        jaxpt.models.from_pretrained(tmp_path / "config.json")


def test_tokenizer_beyond_the_model_vocabulary(tokenizer, tmp_path, no_compile):
    small_vocab = abstract_llama(40)  # the char tokenizer's '+' and '=' have ids above 40
    settings = sft.SFTConfig(output_dir=str(tmp_path / "out"), max_length=16, **SMALL)
    with pytest.raises(ValueError, match=r"token id \d+, but the model's vocabulary has vocab_size=40"):
        sft.train(small_vocab, tokenizer, rows(*arithmetic_texts(4)), settings)


def test_tokenizer_beyond_the_reward_model_vocabulary(tokenizer, tmp_path, no_compile):
    settings = reward.RewardConfig(output_dir=str(tmp_path / "out"), max_length=32, **SMALL)
    with pytest.raises(ValueError, match=r"vocab_size=20"):
        reward.train(abstract_llama(20, num_labels=1), tokenizer, rows(*marker_preferences(4)), settings)


def test_sft_sequences_beyond_max_position_embeddings(tokenizer, tmp_path, no_compile):
    short_context = abstract_llama(len(tokenizer), max_position_embeddings=16)
    settings = sft.SFTConfig(output_dir=str(tmp_path / "out"), max_length=64, **SMALL)
    long_texts = rows(*[{"text": "x" * 40}] * 2)
    with pytest.raises(ValueError, match=r"up to 41 tokens, more than the model's max_position_embeddings=16: "
                                         r"lower max_length"):
        sft.train(short_context, tokenizer, long_texts, settings)


def test_dpo_sequences_beyond_max_position_embeddings(tokenizer, tmp_path, no_compile):
    short_context = abstract_llama(len(tokenizer), max_position_embeddings=16)
    settings = dpo.DPOConfig(output_dir=str(tmp_path / "out"), max_length=64, **SMALL)
    pairs = rows(*[{"prompt": "p" * 10, "chosen": "a" * 20, "rejected": "b"}] * 2)
    with pytest.raises(ValueError, match=r"max_position_embeddings=16: lower max_length"):
        dpo.train(short_context, tokenizer, pairs, settings)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rollouts_beyond_max_position_embeddings(method, tokenizer, tmp_path, no_compile):
    short_context = abstract_llama(len(tokenizer), max_position_embeddings=32)
    module, config_class = (grpo, grpo.GRPOConfig) if method == "grpo" else (rloo, rloo.RLOOConfig)
    settings = config_class(output_dir=str(tmp_path / "out"), num_generations=2, max_completion_length=30,
                            max_prompt_length=8, **{**SMALL, "per_device_train_batch_size": 2})
    with pytest.raises(ValueError, match=r"up to 38 tokens, .*max_position_embeddings=32: lower max_prompt_length \+ "
                                         r"max_completion_length"):
        module.train(short_context, tokenizer, rows(*[{"prompt": "1+2+3+4+5="}] * 2), settings,
                     reward_funcs=[rewards.think_format_reward])


# --------------------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------------------


def returns(value):
    def constant_reward(completions, **kwargs):
        return [value] * len(completions)

    return constant_reward


def keyed_reward(completions, **kwargs):
    return [float(s == c) for s, c in zip(kwargs["solution"], completions, strict=True)]


def strict_reward(completions, solution):
    return [0.0] * len(completions)


def score(function):
    return rewards.score_completions([function], prompts=["p", "q"], completions=["a", "b"],
                                     completion_ids=[[1], [2]], columns={"difficulty": [1, 2]})


REWARD_CASES = [
    (returns(float("inf")), r"'constant_reward' returned inf for completion 0: an infinite reward"),
    (returns(float("-inf")), r"'constant_reward' returned -inf"),
    (returns("high"), r"'constant_reward' returned 'high' for completion 0; rewards are floats"),
    (lambda completions, **kwargs: 1.0, r"'<lambda>' returned float 1.0; it must return a list"),
    (lambda completions, **kwargs: [1.0], r"'<lambda>' returned 1 rewards for 2 completions"),
    (keyed_reward, r"'keyed_reward' looked up 'solution' and failed: .* the dataset columns \['difficulty'\]"),
]


@pytest.mark.parametrize("function, message", REWARD_CASES, ids=[str(i) for i in range(len(REWARD_CASES))])
def test_bad_reward_function_output(function, message):
    with pytest.raises(ValueError, match=message):
        score(function)


def test_nan_reward_is_none_like_trl():
    scored = score(returns(float("nan")))
    assert np.isnan(scored).all()
    scored = score(lambda completions, **kwargs: [None, 2.5])
    assert np.isnan(scored[0, 0]) and scored[1, 0] == 2.5


@pytest.mark.parametrize("function, message", [
    (rewards.accuracy_reward, r"'accuracy_reward' needs the column\(s\) \['solution'\], which the dataset lacks "
                              r"\(its columns: \['difficulty'\]"),
    (strict_reward, r"'strict_reward' takes no \*\*kwargs"),
])
def test_reward_function_that_cannot_be_called_with_the_dataset(function, message):
    with pytest.raises(ValueError, match=message):
        rewards.check_reward_functions([function], columns=["difficulty"])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_reward_function_missing_column_fails_before_the_first_rollout(method, model, tokenizer, tmp_path, no_compile):
    module, config_class = (grpo, grpo.GRPOConfig) if method == "grpo" else (rloo, rloo.RLOOConfig)
    settings = config_class(output_dir=str(tmp_path / "out"), num_generations=2, max_completion_length=4,
                            **{**SMALL, "per_device_train_batch_size": 2})
    with pytest.raises(ValueError, match=r"'accuracy_reward' needs the column\(s\) \['solution'\]"):
        module.train(model, tokenizer, rows({"prompt": "1+1="}, {"prompt": "2+2="}), settings,
                     reward_funcs=["accuracy_reward"])


def test_reward_function_missing_column_of_the_eval_set(model, tokenizer, tmp_path, no_compile):
    settings = grpo.GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=2, max_completion_length=4,
                               eval_strategy="steps", **{**SMALL, "per_device_train_batch_size": 2})
    train_set = rows({"prompt": "1+1=", "solution": "2"}, {"prompt": "2+2=", "solution": "4"})
    with pytest.raises(ValueError, match=r"'accuracy_reward' needs the column\(s\) \['solution'\], which the dataset "
                                         r"lacks \(its columns: \[\]"):
        grpo.train(model, tokenizer, train_set, settings, reward_funcs=["accuracy_reward"],
                   eval_dataset=rows({"prompt": "3+3="}, {"prompt": "1+3="}))


def test_rloo_warns_when_a_completion_gets_no_reward(monkeypatch, caplog):
    """NaN (None) from every reward function: RLOO says so, as GRPO does; the completion's advantage is 0."""
    n, length = 4, 3
    sampled = jaxpt.rollout.Rollout(
        arrays={"prompt_ids": np.ones((n, 2), np.int32), "prompt_mask": np.ones((n, 2), np.int32),
                "completion_ids": np.ones((n, length), np.int32), "attention_mask": np.ones((n, length), np.int32),
                "old_logps": np.zeros((n, length), np.float32)},
        rewards=np.asarray([[1.0], [np.nan], [0.0], [2.0]], np.float32), reward_names=("f",), prompts=["p"] * n,
        completions=["c"] * n, lengths=np.full(n, length), finished=np.ones(n, bool))
    monkeypatch.setattr(rloo, "sample_and_score", lambda *args, **kwargs: sampled)
    settings = rloo.RLOOConfig(num_generations=2, max_completion_length=length, beta=0.0)
    with caplog.at_level(logging.WARNING, logger="jaxpt"):
        arrays, _, _ = rloo.rollout(None, [], [], None, settings, key=None, mesh=None, prompt_buckets=[16])
    assert "Some completions got no reward from any reward function" in caplog.text
    np.testing.assert_allclose(arrays["advantages"], [0.0, 0.0, -2.0, 2.0])


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------


def test_resume_latest_without_a_checkpoint_says_so(tmp_path, caplog):
    settings = sft.SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING, logger="jaxpt"):
        state, step, progress = loop.resume(settings, "fresh state", None, Checkpointer(tmp_path))
    assert (state, step, progress) == ("fresh state", 0, {})
    assert "resume_from_checkpoint='latest', but" in caplog.text and "training starts from scratch" in caplog.text


def test_resume_from_a_path_that_is_not_a_checkpoint(tmp_path):
    settings = sft.SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='.*nope' does not exist"):
        loop.resume(settings, None, None, None)


# --------------------------------------------------------------------------------------------------------------
# Command line (everything here fails before a model is loaded)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_texts(8))


def run_cli(method, model_dir, train_file, output_dir, *extra):
    return cli.main([method, "--model_name_or_path", str(model_dir), "--dataset_name", str(train_file),
                     "--output_dir", str(output_dir), *map(str, extra)])


@pytest.mark.parametrize("config_text, message", [
    ("- max_steps: 3\n", r"holds a list, not a mapping of field names to values"),
    ("just a string\n", r"holds a str, not a mapping"),
    ("max_steps: [1\n", r"not valid YAML"),
])
def test_yaml_config_that_is_not_a_mapping(config_text, message, model_dir, train_file, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(config_text)
    with pytest.raises(ValueError, match=rf"--config .*run.yaml.*{message}"):
        run_cli("sft", model_dir, train_file, tmp_path / "out", "--config", path)


def test_yaml_config_that_does_not_exist(model_dir, train_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config nope.yaml: no such file"):
        run_cli("sft", model_dir, train_file, tmp_path / "out", "--config", "nope.yaml")


CLI_CASES = [
    ("sft", ["--learning_rate", "-1e-3"], ValueError, r"learning_rate=-0.001 must be >= 0"),
    ("sft", ["--max_grad_norm", "-1"], ValueError, r"max_grad_norm=-1.0 must be >= 0"),
    ("dpo", ["--beta", "-0.1"], ValueError, r"beta=-0.1 must be > 0"),
    ("kto", ["--beta", "-.5"], ValueError, r"beta=-0.5 must be > 0"),
    ("grpo", ["--max_prompt_length", "0", "--reward_funcs", "think_format_reward"], ValueError,
     r"max_prompt_length=0 must be >= 1"),
    ("rloo", ["--beta", "-1E-2", "--reward_funcs", "think_format_reward"], ValueError, r"beta=-0.01 must be >= 0"),
    ("grpo", ["--reward_funcs", "acuracy"], ValueError, r"Unknown reward function 'acuracy'"),
    ("grpo", ["--reward_funcs", "no_such_module.reward"], ValueError, r"Cannot import reward function"),
    ("sft", ["--report_to", "tensorbord"], ValueError, r"unknown tracker 'tensorbord'"),
    ("sft", ["--tokenizer_name_or_path", "./no_tokenizer"], FileNotFoundError,
     r"--tokenizer_name_or_path ./no_tokenizer: no such file or directory"),
    ("reward", ["--dataset_name", "data/prefs/missing.jsonl"], FileNotFoundError,
     r"--dataset_name data/prefs/missing.jsonl: no such file or directory"),
    ("grpo", ["--reward_funcs", "think_format_reward", "--reward_model_name_or_path", "./no_rm"], FileNotFoundError,
     r"--reward_model_name_or_path ./no_rm: no such file or directory"),
]


@pytest.mark.parametrize("method, extra, error, message", CLI_CASES, ids=[f"{c[0]}-{c[1][0]}" for c in CLI_CASES])
def test_bad_command_line(method, extra, error, message, model_dir, train_file, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(jaxpt.models, "from_pretrained", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(error, match=message):
        run_cli(method, model_dir, train_file, tmp_path / "out", *extra)
    assert not loaded  # failed before the model was read


def test_cli_output_dir_that_is_a_file_fails_before_the_model_loads(model_dir, train_file, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("x")
    monkeypatch.setattr(jaxpt.models, "from_pretrained", lambda *args, **kwargs: pytest.fail("model loaded"))
    with pytest.raises(NotADirectoryError, match=r"output_dir='.*taken' is a file"):
        run_cli("sft", model_dir, train_file, tmp_path / "taken")


def test_cli_missing_model_directory(train_file, tmp_path):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path ./no/such/model: no such file or directory"):
        run_cli("sft", "./no/such/model", train_file, tmp_path / "out")
    assert time.perf_counter() - started < 5


def test_cli_model_directory_without_tokenizer(model_dir, train_file, tmp_path):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer .*pass --tokenizer_name_or_path"):
        run_cli("sft", weights_only, train_file, tmp_path / "out")


def test_cli_tokenizer_that_cannot_load(model_dir, train_file, tmp_path):
    not_a_tokenizer = tmp_path / "not_a_tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"Cannot load a tokenizer from '.*not_a_tokenizer'.*--tokenizer_name_or_path"):
        run_cli("sft", model_dir, train_file, tmp_path / "out", "--tokenizer_name_or_path", not_a_tokenizer)


def test_cli_tracker_not_installed(model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "tracker_installed", lambda name: False)
    with pytest.raises(ValueError, match=r"report_to=\['wandb', 'tensorboard'\]: wandb needs .*\[tracking\]"):
        run_cli("sft", model_dir, train_file, tmp_path / "out", "--report_to", "wandb", "tensorboard")


def test_cli_parses_negative_numbers_and_the_report_to_list(monkeypatch):
    monkeypatch.setattr(config, "tracker_installed", lambda name: True)
    _, _, settings, _ = cli.parse(rloo.RLOOConfig, ["--model_name_or_path", "m", "--dataset_name", "d",
                                                    "--reward_clip_range", "-1e-1", "2.5", "--report_to", "wandb",
                                                    "tensorboard", "--min_p", "0.1"], cli.RewardArguments)
    assert settings.reward_clip_range == [-0.1, 2.5]
    assert settings.report_to == ["wandb", "tensorboard"]
    assert math.isclose(settings.min_p, 0.1)


class StopBeforeTheStep(Exception):
    pass


def test_cli_prints_jaxpt_info_lines_and_restores_logging(model_dir, train_file, tmp_path, capfd, monkeypatch):
    """`jaxpt` logs its INFO lines through a handler of its own (orbax's root handler is at WARNING), and puts the
    logger back as it was for Python callers. The step is stubbed: the run stops where it would compile it."""

    def stub_step(*args, **kwargs):
        raise StopBeforeTheStep

    monkeypatch.setattr(sft, "make_train_step", lambda *args, **kwargs: stub_step)
    monkeypatch.setattr(sft, "make_eval_step", lambda *args, **kwargs: stub_step)
    jaxpt_logger = logging.getLogger("jaxpt")
    before = (jaxpt_logger.level, jaxpt_logger.propagate, list(jaxpt_logger.handlers))
    with pytest.raises(StopBeforeTheStep):
        run_cli("sft", model_dir, train_file, tmp_path / "out", "--max_steps", "1", "--mesh_fsdp", "1",
                "--per_device_train_batch_size", "2", "--max_length", "16", "--disable_tqdm", "true",
                "--save_final_model", "false", "--save_steps", "0", "--resume_from_checkpoint", "latest")
    err = capfd.readouterr().err
    assert "jaxpt: Compiling the train step for batch shapes" in err
    assert "jaxpt: resume_from_checkpoint='latest', but" in err  # a WARNING through the same handler
    assert (jaxpt_logger.level, jaxpt_logger.propagate, list(jaxpt_logger.handlers)) == before
