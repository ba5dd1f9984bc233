"""LoRA adapters (`jaxpt.lora`): logits equal peft's `PeftModel` for every family, both ways (peft's adapter into
jaxpt, jaxpt's adapter into peft), merging, and what training with adapters must keep (see also the method tests
below: SFT, DPO, GRPO with `use_peft`)."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

import jaxpt.models
from jaxpt import cli, dpo, grpo, lora, sft
from jaxpt.models.layers import LoRAParam
from tests.helpers import arithmetic_texts, char_tokenizer, tiny_llama
from tests.models import parity

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)
GEMMA = dict(TINY, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0)

FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**TINY)),  # q/k/v biases
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**TINY, head_dim=16)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**GEMMA, attn_logit_softcapping=5.0)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request, tmp_path_factory):
    """`(family, base directory)`: a random HF checkpoint of the family."""
    hf_class, hf_config = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(f"base_{request.param}")
    parity.make_hf_checkpoint(hf_class, hf_config, directory)
    return request.param, directory


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def padded_batch(vocab_size):
    return parity.right_padded_batch(vocab_size, (20, 13, 5), 20, seed=7)


def random_peft_adapter(directory, adapter_dir, *, seed, **lora_options):
    """A peft adapter with random, non-zero A and B (`init_lora_weights=False`), saved to `adapter_dir`; returns the
    `PeftModel`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora_options)
    model = peft.get_peft_model(hf_model(directory), config).eval()
    model.save_pretrained(adapter_dir)
    return model


def test_peft_adapter_loads_with_equal_logits(base, tmp_path):
    """A random peft adapter on every linear layer (r=4, rank-stabilised scale) loads through
    `from_pretrained(adapter=...)` with PeftModel's logits; merged, the logits stay the same."""
    family, directory = base
    peft_model = random_peft_adapter(directory, tmp_path, seed=1, r=4, lora_alpha=8, target_modules="all-linear",
                                     use_rslora=True)
    ids, mask = padded_batch(peft_model.config.vocab_size)
    expected = parity.hf_logits(peft_model, ids, mask)
    base_logits = parity.hf_logits(hf_model(directory), ids, mask)
    assert np.abs(expected - base_logits)[mask.astype(bool)].max() > 0.1  # the adapter changes the logits

    model = jaxpt.models.from_pretrained(directory, adapter=tmp_path)
    assert model.lora_settings.r == 4 and model.lora_settings.use_rslora
    assert model.model.layers.mlp.down_proj.lora_a.shape == (2, 4, 64)  # stacked [layers, r, in]
    actual = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    parity.assert_close_on(actual, expected, mask)

    merged = jaxpt.models.merge_adapter(model)
    assert not lora.has_adapters(merged) and merged.model.layers.self_attn.q_proj.lora_a is None
    assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(nnx.state(merged), is_leaf=lambda x: isinstance(
        x, nnx.Variable)))
    parity.assert_close_on(merged(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), expected, mask)


def test_jaxpt_adapter_loads_in_peft_with_equal_logits(base, tmp_path):
    """An adapter made by `apply_lora` (default targets q_proj v_proj, then B set to random values) saved by
    `save_adapter` loads in `peft.PeftModel.from_pretrained` with jaxpt's logits, and back into jaxpt."""
    family, directory = base
    model = jaxpt.models.from_pretrained(directory)
    ids, mask = padded_batch(model.config.vocab_size)
    before = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0), seed=3)
    # B = 0: the adapter adds nothing yet (to float rounding: the extra ops change XLA's fusions)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), before,
                               atol=1e-5)
    attention = model.model.layers.self_attn
    assert attention.k_proj.lora_a is None and attention.q_proj.lora_a.shape == (2, 8, 32)
    for module in (attention.q_proj, attention.v_proj):
        module.lora_b[...] = jax.random.normal(jax.random.key(5), module.lora_b.shape) * 0.5
    actual = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(actual - before)[mask.astype(bool)].max() > 0.1

    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf_model(directory), tmp_path).eval()
    parity.assert_close_on(actual, parity.hf_logits(peft_model, ids, mask), mask)

    reloaded = jaxpt.models.from_pretrained(directory, adapter=tmp_path)
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), actual,
                               atol=1e-6)


def test_partial_layer_adapter_and_modules_to_save(tmp_path):
    """A peft adapter on layer 1's k_proj only (an explicit module name) with a trained lm_head
    (modules_to_save) loads with equal logits; jaxpt saves it back and peft loads that too."""
    hf_class, hf_config = FAMILIES["llama"]
    directory = tmp_path / "base"
    parity.make_hf_checkpoint(hf_class, hf_config, directory)
    peft_model = random_peft_adapter(directory, tmp_path / "peft", seed=2, r=2, lora_alpha=4,
                                     target_modules=["model.layers.1.self_attn.k_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(hf_config.vocab_size)
    expected = parity.hf_logits(peft_model, ids, mask)
    model = jaxpt.models.from_pretrained(directory, adapter=tmp_path / "peft")
    k_a = np.asarray(model.model.layers.self_attn.k_proj.lora_a[...])
    assert not k_a[0].any() and k_a[1].any()  # layer 0 has an adapter that adds exactly 0
    parity.assert_close_on(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), expected, mask)
    assert lora.adapter_parameter_count(model) == 2 * (2 * 32 + 16 * 2) + 96 * 32  # A, B per layer + lm_head

    lora.save_adapter(model, tmp_path / "jaxpt")
    again = peft.PeftModel.from_pretrained(hf_model(directory), tmp_path / "jaxpt").eval()
    parity.assert_close_on(parity.hf_logits(again, ids, mask), expected, mask)


def test_bad_adapters_fail_clearly(tmp_path):
    hf_class, hf_config = FAMILIES["llama"]
    directory = tmp_path / "base"
    parity.make_hf_checkpoint(hf_class, hf_config, directory)
    model = jaxpt.models.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="lora_target_modules=.*matches no linear layer"):
        lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_target_modules=["qkv"], lora_dropout=0.0))
    with pytest.raises(ValueError, match="lora_dropout=1.0 must be in \\[0, 1\\)"):
        lora.LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_r=0 must be >= 1"):
        lora.LoraConfig(lora_r=0)
    random_peft_adapter(directory, tmp_path / "dora", seed=0, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_adapter(model, tmp_path / "dora")
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_dropout=0.0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_dropout=0.0))
    with pytest.raises(ValueError, match="save them with jaxpt.lora.save_adapter"):
        jaxpt.models.save_pretrained(model, tmp_path / "full")


def test_adapters_follow_the_weights_sharding():
    """On a mesh, A splits the weight's `in` dimension as the weight does, B its `out` dimension; the rank stays
    whole."""
    from jax.sharding import PartitionSpec as P

    from jaxpt.models import llama
    from jaxpt.sharding import make_mesh, partition_spec

    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    rules = llama.PARTITION_RULES
    assert partition_spec("model.layers.self_attn.q_proj.lora_a", (2, 8, 32), rules, mesh) == P(None, None, "fsdp")
    assert partition_spec("model.layers.self_attn.q_proj.lora_b", (2, 32, 8), rules, mesh) == P(None, "tensor", None)
    assert partition_spec("model.layers.mlp.down_proj.lora_a", (2, 8, 64), rules, mesh) == P(None, None, "tensor")
    assert partition_spec("model.layers.mlp.down_proj.lora_b", (2, 32, 8), rules, mesh) == P(None, "fsdp", None)


# ---------------------------------------------------------------------------------------------------------------
# Training with adapters
# ---------------------------------------------------------------------------------------------------------------

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with the char tokenizer, in HF format (the base the adapters go on)."""
    directory = tmp_path_factory.mktemp("tiny_base")
    TOKENIZER.save_pretrained(directory)
    jaxpt.models.save_pretrained(tiny_llama(VOCAB), directory)
    return directory


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def peft_logits_equal_jaxpt(base_dir, adapter_dir, model, ids):
    peft_model = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()
    expected = parity.hf_logits(peft_model, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4)


def test_sft_with_lora_trains_only_the_adapters(tiny_dir, tmp_path):
    """`sft.train` on an 8-device mesh with adapters on every linear layer (and LoRA dropout 0.05): the loss goes
    down, the base parameters come out bit-identical, the optimizer state is the adapters' size (AdamW: two moments),
    and `final/` is a peft adapter that peft loads with jaxpt's logits."""
    model = jaxpt.models.from_pretrained(tiny_dir)
    base = host_copy(nnx.state(model, nnx.Param))
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=8, lora_dropout=0.05,
                                           lora_target_modules=["all-linear"]))
    adapter_size = lora.adapter_parameter_count(model)
    # 2 layers x r=8 x (in + out) of q, k, v (2 kv heads of 8), o, gate, up, down
    assert adapter_size == 2 * 8 * (64 + 48 + 48 + 64 + 3 * (32 + 64)) and adapter_size < size(base) / 3
    config = sft.SFTConfig(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=1, logging_steps=5,
                           learning_rate=1e-2, max_steps=30, save_steps=0, disable_tqdm=True, seed=0,
                           completion_only_loss=False)
    result = sft.train(model, TOKENIZER, datasets.Dataset.from_list(arithmetic_texts(64)), config)

    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # a random tiny base with frozen embeddings: 4.3 -> 3.5
    state = result.state
    assert size(state.params) == adapter_size
    assert adapter_size * 2 <= size(state.opt_state) <= adapter_size * 2 + 16  # mu, nu (+ counters)
    for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree.leaves(state.frozen),
                                     strict=True):
        np.testing.assert_array_equal(np.asarray(after), before, err_msg=str(path))
    assert {p.name for p in (tmp_path / "final").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                 "tokenizer.json"}
    ids = np.asarray([TOKENIZER("3+4=7")["input_ids"]])
    peft_logits_equal_jaxpt(tiny_dir, tmp_path / "final", state.model(), ids)


def test_sft_command_with_use_peft(tiny_dir, tmp_path):
    """`jaxpt sft --use_peft --lora_r 8 ...` (TRL's default lora_dropout, 0.05): trains, lowers the loss, exports an
    adapter peft loads."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in arithmetic_texts(48)) + "\n")
    out = tmp_path / "out"
    args = ["sft", "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "24", "--logging_steps", "6", "--learning_rate", "0.01", "--per_device_train_batch_size",
            "4", "--max_length", "16", "--mesh_fsdp", "1", "--disable_tqdm", "true", "--completion_only_loss",
            "false", "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "k_proj",
            "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cli.main(args) == 0  # TRL's default lora_dropout, 0.05
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.4  # 4.3 -> 3.7 (a random tiny base)
    assert records[-1]["mean_token_accuracy"] > records[0]["mean_token_accuracy"] + 0.3
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 7
    assert config["lora_dropout"] == 0.05 and config["base_model_name_or_path"] == str(tiny_dir)
    model = jaxpt.models.from_pretrained(tiny_dir, adapter=out / "final")
    peft_logits_equal_jaxpt(tiny_dir, out / "final", model, np.asarray([TOKENIZER("2+5=7")["input_ids"]]))


def digits_reward(completions, **kwargs):
    """The fraction of characters that are digits (about 10% for a random policy)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_online_reference_is_the_base_with_adapters_off(tiny_dir):
    """GRPO/RLOO's KL reference under LoRA (`rollout.reference_params`): the adapters switched off joined with the
    state's frozen base (the same arrays, no copy); its log-probs are the base model's, the policy's are not."""
    import optax

    from jaxpt.rollout import completion_logps, reference_params
    from jaxpt.train_state import TrainState

    model = jaxpt.models.from_pretrained(tiny_dir)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=4, lora_dropout=0.0))
    state = TrainState.create(model, optax.sgd(0.1))
    state = state.replace(params=jax.tree.map(lambda x: x + 0.3, state.params))  # B != 0: the policy moved
    reference = reference_params(state)
    frozen = {id(x) for x in jax.tree.leaves(state.frozen)}
    assert frozen <= {id(x) for x in jax.tree.leaves(reference)}  # the base arrays themselves
    ids = jnp.asarray([TOKENIZER("ab12")["input_ids"]])
    batch = {"prompt_ids": ids[:, :2], "prompt_mask": jnp.ones_like(ids[:, :2]), "completion_ids": ids[:, 2:],
             "attention_mask": jnp.ones_like(ids[:, 2:])}
    base = jaxpt.models.from_pretrained(tiny_dir)
    expected, _ = completion_logps(nnx.state(base, nnx.Param), nnx.graphdef(base), batch, temperature=1.0)
    actual, _ = completion_logps(reference, state.graphdef, batch, temperature=1.0)
    policy, _ = completion_logps(state.full_params(), state.graphdef, batch, temperature=1.0)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(policy) - np.asarray(expected)).max() > 0.05


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tiny_dir, tmp_path):
    """Under LoRA a checkpoint holds the adapters and their optimizer state (not the frozen base); resuming from
    step 2 on the same base reproduces the uninterrupted run's adapters."""
    def run(output_dir, **overrides):
        model = jaxpt.models.from_pretrained(tiny_dir)
        lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=4, lora_dropout=0.0))
        config = sft.SFTConfig(output_dir=str(output_dir), max_length=16, per_device_train_batch_size=2,
                               logging_steps=1, learning_rate=1e-2, max_steps=4, save_steps=2, disable_tqdm=True,
                               seed=0, mesh_fsdp=1, save_final_model=False, completion_only_loss=False, **overrides)
        return sft.train(model, TOKENIZER, datasets.Dataset.from_list(arithmetic_texts(16)), config).state

    full = run(tmp_path / "full")
    base_bytes = 4 * size(nnx.state(jaxpt.models.from_pretrained(tiny_dir), nnx.Param))
    saved_bytes = sum(p.stat().st_size for p in (tmp_path / "full" / "checkpoints" / "2").rglob("*") if p.is_file())
    # adapters + moments ~20 KB and orbax's metadata 20-40 KB (it varies from run to run); the base alone ~100 KB
    assert saved_bytes < 0.75 * base_bytes, (saved_bytes, base_bytes)
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoints" / "2"))
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------------------
# LoRA dropout
# ---------------------------------------------------------------------------------------------------------------


def test_lora_dropout_drops_the_adapter_input_only_while_training():
    """peft's LoRA dropout, `scale * B A dropout(x)`: with A = B = identity and a zero base weight the layer returns
    dropout(x) itself; every entry is 0 or x / (1 - p), about p of them 0, new masks for a new key; outside
    `adapter_dropout` (evaluation, sampling, references) the layer returns x exactly."""
    from jaxpt.models.layers import Linear, adapter_dropout

    features, rate = 64, 0.25
    layer = Linear(features, features, rngs=nnx.Rngs(0))
    layer.weight[...] = jnp.zeros((features, features))
    layer.lora_a, layer.lora_b = LoRAParam(jnp.eye(features)), LoRAParam(jnp.eye(features))
    layer.lora_scale, layer.lora_dropout = 1.0, rate
    x = jax.random.normal(jax.random.key(0), (32, features)) + 3.0  # no exact zeros
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))
    outputs = []
    for seed in (1, 2):
        with adapter_dropout(jax.random.key(seed)):
            outputs.append(np.asarray(layer(x)))
    for out in outputs:
        dropped = out == 0.0
        np.testing.assert_allclose(out[~dropped], np.asarray(x)[~dropped] / (1 - rate), rtol=1e-6)
        assert abs(dropped.mean() - rate) < 0.03, dropped.mean()
    assert (outputs[0] == 0).mean() != (outputs[1] == 0).mean() or (outputs[0] != outputs[1]).any()
    assert ((outputs[0] == 0) != (outputs[1] == 0)).mean() > 0.2  # independent masks: ~2p(1-p) = 0.375 differ


def lora_sft_state(tiny_dir, *, lora_dropout, b_scale=0.0):
    import optax

    from jaxpt.train_state import TrainState

    model = jaxpt.models.from_pretrained(tiny_dir)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=4, lora_dropout=lora_dropout,
                                           lora_target_modules=["all-linear"]), seed=1)
    state = TrainState.create(model, optax.sgd(0.1))
    if b_scale:
        state = state.replace(params=jax.tree_util.tree_map_with_path(
            lambda path, x: x + b_scale if "lora_b" in jax.tree_util.keystr(path) else x, state.params))
    config = sft.SFTConfig(output_dir="unused", max_length=16, completion_only_loss=False, seed=0)
    examples = sft.prepare_dataset(datasets.Dataset.from_list(arithmetic_texts(8)), TOKENIZER, config)
    batch = {k: jnp.asarray(v[0]) for k, v in sft.collate(examples, accumulation_steps=1, buckets=[16]).items()}
    return state, config, batch


def dropout_grads_fn(state, config, batch):
    """`grads(params, step, micro_index)` of the SFT loss as the train step differentiates it (jitted once)."""
    num_tokens = jnp.maximum(jnp.sum(sft._targets(batch)[1]), 1.0)

    def grads(params, step, micro_index):
        grad_fn = lora.value_and_grad(sft.loss_fn, state.replace(step=step), seed=config.seed)
        return grad_fn(params, state.graphdef, batch, config, num_tokens, micro_index=micro_index)[1]

    return jax.jit(grads)


def flat(grads):
    return np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads)])


def test_lora_dropout_gradients(tiny_dir):
    """The train step's gradients with LoRA dropout (`lora.value_and_grad`): lora_dropout=0 gives exactly the
    plain gradient; p > 0 gives other gradients, the same again for the same (seed, step, micro-batch) (so a
    resumed run reproduces them) and new ones for another micro-batch or step; and at B = 0, where the gradient of
    B is linear in dropout(x), their mean over many masks is the gradient without dropout (inverted dropout keeps
    the expectation). The model called outside a step (evaluation, sampling) is the same with or without dropout."""
    state, config, batch = lora_sft_state(tiny_dir, lora_dropout=0.0, b_scale=0.01)
    num_tokens = jnp.maximum(jnp.sum(sft._targets(batch)[1]), 1.0)
    plain = jax.jit(jax.grad(lambda p: sft.loss_fn(state.full_params(p), state.graphdef, batch, config,
                                                   num_tokens)[0]))(state.params)
    grads_without_dropout = dropout_grads_fn(state, config, batch)  # compiled once, used again at B = 0 below
    without = grads_without_dropout(state.params, 0, 0)
    np.testing.assert_allclose(flat(without), flat(plain), rtol=0, atol=1e-6)  # the same computation

    dropped_state, _, _ = lora_sft_state(tiny_dir, lora_dropout=0.3, b_scale=0.01)
    dropped_grads = dropout_grads_fn(dropped_state, config, batch)
    first, again = dropped_grads(dropped_state.params, 0, 0), dropped_grads(dropped_state.params, 0, 0)
    other_micro, other_step = dropped_grads(dropped_state.params, 0, 1), dropped_grads(dropped_state.params, 1, 0)
    np.testing.assert_array_equal(flat(first), flat(again))
    for other in (without, other_micro, other_step):
        assert np.abs(flat(first) - flat(other)).max() > 1e-3 * np.abs(flat(without)).max()
    ids = jnp.asarray(batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(dropped_state.model()(ids)), np.asarray(state.model()(ids)))

    # B = 0 (as apply_lora starts): the gradient of B is linear in dropout(x), so its mean over masks is exact
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, dropped_state.params)
    expected = grads_without_dropout(zero_b, 0, 0)
    many = jax.jit(jax.vmap(dropped_grads, in_axes=(None, None, 0)))(zero_b, 0, jnp.arange(256))
    mean = jax.tree.map(lambda g: g.mean(axis=0), many)
    b_only = lambda tree: flat(nnx.filter_state(tree, lambda path, _: path[-1] == "lora_b"))  # noqa: E731
    expected_b, mean_b, one_b = b_only(expected), b_only(mean), b_only(jax.tree.map(lambda g: g[0], many))
    scale = np.abs(expected_b).max()
    assert np.abs(one_b - expected_b).max() > 0.2 * scale  # one mask: far from it
    assert np.abs(mean_b - expected_b).max() < 0.1 * scale, np.abs(mean_b - expected_b).max() / scale


# ---------------------------------------------------------------------------------------------------------------
# KTO: the reference under LoRA
# ---------------------------------------------------------------------------------------------------------------

KTO_ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b + (0 if good else 3)), "label": good}
            for a, b, good in zip(range(8), [3, 1, 4, 1, 5, 9, 2, 6], [True, False] * 4, strict=True)]


def adapted_model(tiny_dir):
    """A tiny Llama with LoRA on every linear layer and B != 0: the policy already differs from the base."""
    model = jaxpt.models.from_pretrained(tiny_dir)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=4, lora_dropout=0.1, lora_target_modules=[
        "all-linear"]), seed=2)
    for _, module in lora._linear_modules(model):
        if module.lora_b is not None:
            module.lora_b[...] = jax.random.normal(jax.random.key(3), module.lora_b.shape) * 0.3
    return model


def test_kto_with_lora_uses_the_base_with_adapters_off_as_reference(tiny_dir, tmp_path, monkeypatch):
    """KTO under LoRA, like DPO: the reference the step receives is the adapters switched off (the adapters' size,
    every B zero: no copy of the base), joined with the frozen base inside the step, so its log-probs are the plain
    base model's, not the (already adapted) policy's. With precomputed reference log-probs, the same reference."""
    from jaxpt import kto

    recorded = []
    original_step = kto.make_train_step

    def recording_step(*args, **kwargs):
        step = original_step(*args, **kwargs)
        return lambda state, batch, ref_params=None: (recorded.append((ref_params, kwargs["ref_graphdef"])),
                                                      step(state, batch, ref_params))[1]

    monkeypatch.setattr(kto, "make_train_step", recording_step)
    config = kto.KTOConfig(output_dir=str(tmp_path), max_length=16, per_device_train_batch_size=2, logging_steps=1,
                           learning_rate=1e-2, max_steps=2, save_steps=0, disable_tqdm=True, seed=0, mesh_fsdp=1,
                           save_final_model=False)
    model = adapted_model(tiny_dir)
    result = kto.train(model, TOKENIZER, datasets.Dataset.from_list(KTO_ROWS), config)
    state = result.state
    reference, ref_graphdef = recorded[0]
    assert ref_graphdef is None and size(reference) == size(state.params) == lora.adapter_parameter_count(model)
    assert not any(np.asarray(b).any() for b in jax.tree.leaves(nnx.filter_state(reference, lambda p, _: p[-1] ==
                                                                                  "lora_b")))
    examples = kto.prepare_dataset(datasets.Dataset.from_list(KTO_ROWS[:4]), TOKENIZER, config)
    batch = {k: jnp.asarray(v[0]) for k, v in kto.collate(examples, accumulation_steps=1, buckets=[16]).items()}
    base = jaxpt.models.from_pretrained(tiny_dir)
    expected = kto._sequence_logps(nnx.state(base, nnx.Param), nnx.graphdef(base), batch, config)
    in_step = kto._sequence_logps(state.full_params(reference), state.graphdef, batch, config)
    policy = kto._sequence_logps(state.full_params(), state.graphdef, batch, config)
    np.testing.assert_allclose(np.asarray(in_step), np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(policy) - np.asarray(expected)).max() > 0.1

    precomputed = []
    original_precompute = kto.precompute_ref_logps
    monkeypatch.setattr(kto, "precompute_ref_logps", lambda examples, *args, **kwargs: precomputed.append(
        original_precompute(examples, *args, **kwargs)) or precomputed[-1])
    kto.train(adapted_model(tiny_dir), TOKENIZER, datasets.Dataset.from_list(KTO_ROWS[:4]),
              config.replace(output_dir=str(tmp_path / "pre"), precompute_ref_log_probs=True, max_steps=1))
    assert recorded[-1][0] is None
    ids = lambda e: tuple(np.concatenate([e["prompt_ids"], e["completion_ids"]]).tolist())  # noqa: E731
    by_ids = {ids(e): e["ref_logps"] for e in precomputed[0]}
    for example, value in zip(examples, np.asarray(expected), strict=True):
        assert by_ids[ids(example)] == pytest.approx(value, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The commands with --use_peft
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_dpo_command_with_use_peft_and_merged_export(tiny_dir, tmp_path, monkeypatch):
    """`jaxpt dpo --use_peft ... --merge_adapter_on_save true` (TRL's default lora_dropout 0.05): the margin grows;
    final/ is an adapter peft loads with jaxpt's logits, final_merged/ a full checkpoint transformers loads with the
    same logits. Without --use_peft the flag is refused. The reference the step receives is the adapters switched
    off (the adapters' size, every B zero: no copy of the base), joined with the one frozen base inside the step:
    its log-probs equal the plain base model's, while the trained policy's moved away."""
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 2)}
            for a, b in zip(range(10), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], strict=True)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    args = ["dpo", "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "12", "--logging_steps", "1", "--learning_rate", "0.02", "--beta", "0.5",
            "--per_device_train_batch_size", "2", "--max_length", "16", "--mesh_fsdp", "1", "--disable_tqdm", "true",
            "--merge_adapter_on_save", "true"]
    with pytest.raises(ValueError, match="--merge_adapter_on_save merges LoRA adapters.*--use_peft is not set"):
        cli.main(args)
    references = []
    original_reference_params = dpo.reference_params
    monkeypatch.setattr(dpo, "reference_params", lambda *a, **k: references.append(
        original_reference_params(*a, **k)) or references[-1])
    assert cli.main([*args, "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # B = 0 at the start: policy = reference
    margins = [r["rewards/margins"] for r in records]
    assert np.mean(margins[-3:]) > np.mean(margins[:3]) + 0.3, margins
    assert json.loads((out / "final" / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    model = jaxpt.models.from_pretrained(tiny_dir, adapter=out / "final")
    ids = np.asarray([TOKENIZER("3+4=7")["input_ids"]])
    peft_logits_equal_jaxpt(tiny_dir, out / "final", model, ids)
    assert not (out / "final_merged" / "adapter_config.json").exists()
    merged = parity.hf_logits(hf_model(out / "final_merged"), ids)
    np.testing.assert_allclose(merged, np.asarray(model(jnp.asarray(ids))), atol=1e-4)
    base = parity.hf_logits(hf_model(tiny_dir), ids)
    assert np.abs(merged - base).max() > 1e-3  # the merged weights are not the base's

    from jaxpt.train_state import TrainState

    (reference,) = references
    state = TrainState.create(model, optax.sgd(0.1))  # the trained adapters on the frozen base
    assert size(reference) == size(state.params) == lora.adapter_parameter_count(model)  # no copy of the base
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(reference, is_leaf=is_variable))
    assert not any(np.asarray(b).any() for b in jax.tree.leaves(nnx.filter_state(reference, lambda p, _: p[-1] ==
                                                                                  "lora_b")))
    config = dpo.DPOConfig(output_dir=str(tmp_path), max_length=16, beta=0.5)
    examples = dpo.prepare_dataset(datasets.Dataset.from_list(rows[:4]), TOKENIZER, config)
    batch = {k: jnp.asarray(v[0]) for k, v in dpo.collate(examples, accumulation_steps=1, buckets=[16]).items()}
    base_model = jaxpt.models.from_pretrained(tiny_dir)
    base_graphdef, base_params = nnx.split(base_model, nnx.Param)
    expected = dpo.reference_logps(base_params, base_graphdef, batch, config)
    in_step = dpo.reference_logps(state.full_params(reference), state.graphdef, batch, config)
    policy = dpo.reference_logps(state.full_params(), state.graphdef, batch, config)
    np.testing.assert_allclose(np.asarray(in_step), np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(policy[0]) - np.asarray(expected[0])).max() > 0.1


def test_grpo_command_with_use_peft_samples_with_the_adapters(tiny_dir, tmp_path):
    """`jaxpt grpo --use_peft ...` (adapters on every linear layer, dropout 0.05): the digits reward rises, and
    final/ is an adapter (with the lm_head) that peft loads with jaxpt's logits. On this random tiny base, adapters
    alone move the reward slowly (the final norm bounds what the hidden states can do to the frozen output head), so
    lm_head trains too (lora_modules_to_save, as a user would for a new head); with beta > 0 that is refused. The
    sampler runs the adapted model (its log-probs are the adapted model's, not the base's) with no merge."""
    from jaxpt.rollout import completion_logps, sample_and_score
    from jaxpt.train_state import TrainState

    rows = [{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    args = ["grpo", "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--reward_funcs", "tests.test_lora.digits_reward", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--learning_rate", "0.03",
            "--max_steps", "14", "--logging_steps", "1", "--mesh_fsdp", "1", "--disable_tqdm", "true",
            "--use_peft", "--lora_r", "8", "--lora_alpha", "32", "--lora_target_modules", "all-linear",
            "--lora_modules_to_save", "lm_head"]
    with pytest.raises(ValueError, match="lora_modules_to_save=\\['lm_head'\\] train in full"):
        cli.main([*args, "--beta", "0.1"])
    assert cli.main(args) == 0
    rewards = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["lora_dropout"] == 0.05
    model = jaxpt.models.from_pretrained(tiny_dir, adapter=out / "final")
    peft_logits_equal_jaxpt(tiny_dir, out / "final", model, np.asarray([TOKENIZER("ab12")["input_ids"]]))

    state = TrainState.create(model, optax.sgd(0.1))  # the trained adapters on the frozen base, as in training
    assert size(state.params) == lora.adapter_parameter_count(model) < size(state.frozen)
    grpo_config = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                                  max_completion_length=8, mesh_fsdp=1, seed=0)
    prepared = [{"prompt": "ab", "prompt_ids": TOKENIZER("ab")["input_ids"], "columns": {}}]
    sampled = sample_and_score(state, prepared, [digits_reward], TOKENIZER, grpo_config, key=jax.random.key(1),
                               mesh=None, prompt_buckets=[16])
    batch = {k: jnp.asarray(v) for k, v in sampled.arrays.items()}
    valid = np.asarray(sampled.arrays["attention_mask"], bool)
    adapted, _ = completion_logps(state.full_params(), state.graphdef, batch, temperature=1.0)
    np.testing.assert_allclose(np.asarray(adapted)[valid], sampled.arrays["sampler_logps"][valid], atol=2e-5)
    base = jaxpt.models.from_pretrained(tiny_dir)
    base_logps, _ = completion_logps(nnx.state(base, nnx.Param), nnx.graphdef(base), batch, temperature=1.0)
    assert np.abs(np.asarray(base_logps) - sampled.arrays["sampler_logps"])[valid].max() > 0.1


def test_explicit_reference_models_under_lora(tiny_dir, tmp_path):
    """An explicit ref_model under LoRA: GRPO/RLOO run it with the policy's adapters switched off
    (`lora.with_adapters_off`: its log-probs are its own model's); DPO's in-step reference refuses it, naming
    precompute_ref_log_probs."""
    import optax

    from jaxpt.rollout import completion_logps
    from jaxpt.train_state import TrainState

    state = TrainState.create(adapted_model(tiny_dir), optax.sgd(0.1))
    other = tiny_llama(VOCAB, seed=5)
    ids = jnp.asarray([TOKENIZER("ab12")["input_ids"]])
    batch = {"prompt_ids": ids[:, :2], "prompt_mask": jnp.ones_like(ids[:, :2]), "completion_ids": ids[:, 2:],
             "attention_mask": jnp.ones_like(ids[:, 2:])}
    expected, _ = completion_logps(nnx.state(other, nnx.Param), nnx.graphdef(other), batch, temperature=1.0)
    reference = lora.with_adapters_off(nnx.state(other, nnx.Param), state)
    actual, _ = completion_logps(reference, state.graphdef, batch, temperature=1.0)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)

    config = dpo.DPOConfig(output_dir=str(tmp_path), max_length=16, max_steps=1, disable_tqdm=True)
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
    with pytest.raises(ValueError, match="ref_model with a LoRA policy.*precompute_ref_log_probs=True"):
        dpo.train(adapted_model(tiny_dir), TOKENIZER, datasets.Dataset.from_list(rows), config, ref_model=other)
