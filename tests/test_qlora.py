"""QLoRA (`jaxpt.quantize`): NF4 and int8 against float64 reference quantizers, quantized logits against the float
model, sharding, memory, and training LoRA adapters on a quantized base (SFT, the command line, the GRPO sampler)."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

import jaxpt.models
from jaxpt import cli, lora, quantize, sft
from jaxpt.models.layers import LoRAParam
from jaxpt.train_state import TrainState
from tests.helpers import arithmetic_texts, char_tokenizer, tiny_llama, tiny_llama_config

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
# hidden 64: the decoder's linear layers have in_features 64 or 128, whole NF4 blocks of 64
TINY = dict(hidden_size=64, intermediate_size=128, initializer_range=0.05)


def nf4_levels_float64() -> np.ndarray:
    """The 16 NF4 levels derived in float64 as the QLoRA paper builds them: quantiles of N(0, 1) at evenly spaced
    probabilities from 1 - delta to 1/2, 8 for the positive side and 7 for the negative, plus an exact 0, scaled
    to [-1, 1] (delta = 0.0322917, half of 1/32 + 1/30, the offset bitsandbytes uses)."""
    offset = 0.9677083
    positive = scipy.stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -scipy.stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    return levels / np.abs(levels).max()


def reference_nf4(weight: np.ndarray, block_size: int):
    """float64 NF4: `(level indices [out, in], absmax [out, in / block], dequantized [out, in])` by nearest level."""
    levels = nf4_levels_float64()
    blocks = weight.astype(np.float64).reshape(weight.shape[0], -1, block_size)
    absmax = np.abs(blocks).max(-1)
    normalized = blocks / np.where(absmax == 0, 1.0, absmax)[..., None]
    codes = np.abs(normalized[..., None] - levels).argmin(-1)
    return codes.reshape(weight.shape), absmax, (levels[codes] * absmax[..., None]).reshape(weight.shape), normalized


def test_nf4_levels_are_the_normal_quantiles():
    np.testing.assert_allclose(quantize.NF4_LEVELS, nf4_levels_float64(), atol=2e-7)
    assert quantize.NF4_LEVELS[7] == 0.0 and quantize.NF4_LEVELS[0] == -1.0 and quantize.NF4_LEVELS[15] == 1.0


def test_nf4_round_trip_matches_a_float64_reference():
    """Random normal weights (plus a block of zeros and a block made of exact levels): the packed indices, the block
    absmax and the dequantized weight are the float64 reference's; the error is at most half the widest level gap
    times the block absmax."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(48, 256)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(48, 1)).astype(np.float32)
    weight[3, 64:128] = 0.0
    weight[5, :64] = np.tile(quantize.NF4_LEVELS, 4) * 0.75  # exact levels of a block with absmax 0.75
    packed, absmax = quantize.quantize_nf4(jnp.asarray(weight), block_size=64)
    assert packed.dtype == jnp.uint8 and packed.shape == (48, 128) and absmax.shape == (48, 4)

    codes, ref_absmax, ref_weight, normalized = reference_nf4(weight, 64)
    packed = np.asarray(packed)
    unpacked = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(weight.shape)  # even feature in the high nibble
    midpoints = (nf4_levels_float64()[1:] + nf4_levels_float64()[:-1]) / 2
    near_a_midpoint = (np.abs(normalized[..., None] - midpoints).min(-1) < 1e-6).reshape(weight.shape)
    assert near_a_midpoint.mean() < 1e-3
    np.testing.assert_array_equal(unpacked[~near_a_midpoint], codes[~near_a_midpoint])
    np.testing.assert_allclose(np.asarray(absmax), ref_absmax, rtol=1e-7)

    restored = np.asarray(quantize.dequantize_nf4(jnp.asarray(packed), absmax, dtype=jnp.float32))
    scale = np.repeat(ref_absmax, 64, axis=-1)
    np.testing.assert_allclose(restored[~near_a_midpoint], ref_weight[~near_a_midpoint],
                               atol=1e-6 * scale.max())
    assert not restored[3, 64:128].any()
    np.testing.assert_array_equal(restored[5, :64], weight[5, :64])
    max_half_gap = np.diff(nf4_levels_float64()).max() / 2  # 0.1385, between 0.7230 and 1
    assert np.all(np.abs(restored - weight) <= max_half_gap * scale + 1e-6)
    # on normal weights NF4's error is ~10% of the weights' spread (4 bits)
    relative = np.linalg.norm(restored - weight) / np.linalg.norm(weight)
    assert 0.05 < relative < 0.12, relative
    bf16 = quantize.dequantize_nf4(jnp.asarray(packed), absmax, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), restored, atol=0.01 * scale.max())


@pytest.mark.parametrize("block_size", [None, 32])
def test_int8_round_trip_matches_a_float64_reference(block_size):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(24, 128)).astype(np.float32)
    quantized, scale = quantize.quantize_int8(jnp.asarray(weight), block_size=block_size)
    blocks = weight.astype(np.float64).reshape(24, -1, block_size or 128)
    ref_scale = np.abs(blocks).max(-1) / 127
    ref = np.round(blocks / ref_scale[..., None]).reshape(weight.shape)
    assert quantized.dtype == jnp.int8 and scale.shape == ref_scale.shape == (24, 1 if block_size is None else 4)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    assert (np.asarray(quantized) != ref).mean() < 1e-3  # only float32-vs-float64 ties at x.5 may differ
    assert np.abs(np.asarray(quantized)).max() == 127
    restored = np.asarray(quantize.dequantize_int8(quantized, scale))
    assert np.all(np.abs(restored - weight) <= np.repeat(ref_scale, block_size or 128, -1) * 0.5 + 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

IDS = jax.random.randint(jax.random.key(0), (4, 16), 3, VOCAB)


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def float_logits():
    return np.asarray(tiny_llama(VOCAB, **TINY)(IDS))


# Measured on this tiny random Llama (2 layers, hidden 64, weights N(0, 0.05)): relative L2 error of the logits
# 0.012 (int8, per channel) and 0.19 (nf4, blocks of 64); NF4's per-weight error is ~10% (above), int8's ~0.5%.
LOGITS_TOLERANCE = {"int8": 0.025, "nf4": 0.3}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_logits_are_close_to_the_float_model(kind, float_logits):
    """The quantized model's logits are within the measured tolerance of the float model's; they equal exactly those
    of the float model holding the dequantized weights (the on-the-fly dequantization is the whole difference), and
    the decoder's linear weights take 1/4 (int8) and 4.5/32 (nf4) of their float32 bytes."""
    model = tiny_llama(VOCAB, **TINY)
    float_bytes = quantize.parameter_bytes(nnx.state(model.model.layers, nnx.Param))
    linear_float_bytes = sum(4 * np.prod(m.weight.shape) for _, m in quantize._quantized_modules(model))
    quantize.quantize_model(model, kind=kind)
    q_proj = model.model.layers.self_attn.q_proj
    assert q_proj.quantization == quantize.Quantization(kind=kind, block_size=64 if kind == "nf4" else None)
    assert model.lm_head.quantization is None and model.lm_head.weight.dtype == jnp.float32  # kept in float
    logits = np.asarray(model(IDS))
    error = relative_error(logits, float_logits)
    assert 0.2 * LOGITS_TOLERANCE[kind] < error < LOGITS_TOLERANCE[kind], error
    assert (logits.argmax(-1) == float_logits.argmax(-1)).mean() > (0.95 if kind == "int8" else 0.6)

    linear_bytes = sum(quantize.parameter_bytes((m.weight[...], m.weight_scale[...]))
                       for _, m in quantize._quantized_modules(model))
    if kind == "int8":  # 1 byte per weight + a float32 scale per output row
        rows = sum(np.prod(m.weight.shape[:-1]) for _, m in quantize._quantized_modules(model))  # layers x out
        assert linear_bytes == linear_float_bytes / 4 + 4 * rows
        assert linear_bytes / linear_float_bytes < 0.25 + 1 / 64 + 1e-9  # 1/4 + 1/in (0.2502 at in=4096)
    else:  # half a byte per weight + a float32 absmax per 64 weights: 4.5 bits
        assert linear_bytes == linear_float_bytes * 4.5 / 32
    assert quantize.parameter_bytes(nnx.state(model.model.layers, nnx.Param)) < float_bytes * (
        0.28 if kind == "int8" else 0.16)  # with the layers' float norms

    quantize.dequantize_model(model)
    assert model.model.layers.self_attn.q_proj.weight.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(model(IDS)), logits)


def test_quantized_weights_follow_the_partition_rules(tmp_path):
    """On a (data 2, fsdp 2, tensor 2) mesh the packed weights split like the float ones (layer axis whole) and
    their scales alike; the logits are the unsharded quantized model's."""
    from jax.sharding import PartitionSpec as P

    from jaxpt.sharding import make_mesh

    jaxpt.models.save_pretrained(tiny_llama(VOCAB, **TINY), tmp_path)
    plain = quantize.quantize_model(jaxpt.models.from_pretrained(tmp_path), kind="nf4")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = quantize.quantize_model(jaxpt.models.from_pretrained(tmp_path, mesh=mesh), kind="nf4")
    attention = model.model.layers.self_attn
    assert attention.q_proj.weight[...].sharding.spec == P(None, "tensor", "fsdp")  # [layers, out, in / 2]
    assert attention.q_proj.weight_scale[...].sharding.spec == P(None, "tensor", None)  # in / 64 = 1: whole
    assert attention.o_proj.weight[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.model.layers.mlp.down_proj.weight_scale[...].sharding.spec == P(None, "fsdp", "tensor")  # 128/64
    for (_, a), (_, b) in zip(quantize._quantized_modules(model), quantize._quantized_modules(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a.weight[...]), np.asarray(b.weight[...]))

    graphdef, params = nnx.split(model)

    @jax.jit
    def logits(params, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(graphdef, params)(ids)

    np.testing.assert_allclose(np.asarray(logits(params, IDS)), np.asarray(plain(IDS)), atol=1e-5)


@pytest.mark.parametrize(("kind", "mesh_shape"), [("nf4", dict(data=2, fsdp=2, tensor=2)), ("int8", None)])
def test_quantize_on_load_equals_quantizing_after_a_float_load(kind, mesh_shape, tmp_path, monkeypatch):
    """`from_pretrained(..., quantization=)` gives `quantize_model` of the float model bit for bit (values, dtypes,
    shardings on a mesh), and while it loads, the float arrays alive beyond the unquantized parameters and the
    scales are at most one layer's weight: never the float model's decoder weights."""
    from jaxpt.sharding import make_mesh, path_name

    jaxpt.models.save_pretrained(tiny_llama(VOCAB, **TINY), tmp_path)
    mesh = make_mesh(**mesh_shape) if mesh_shape else None
    expected = quantize.quantize_model(jaxpt.models.from_pretrained(tmp_path, mesh=mesh), kind=kind)
    expected_leaves = jax.tree_util.tree_flatten_with_path(nnx.state(expected))[0]

    before = {id(a) for a in jax.live_arrays()}
    peak = 0
    read = jaxpt.models.load_array

    def load_array_watching_memory(*args, **kwargs):  # every tensor load, quantized layers' included
        nonlocal peak
        array = read(*args, **kwargs)
        peak = max(peak, sum(a.nbytes for a in jax.live_arrays()
                             if id(a) not in before and jnp.issubdtype(a.dtype, jnp.floating)))
        return array

    stacked_reads, read_stacked = [], jaxpt.models.load_stacked_array

    def load_stacked_array_noting_names(reader, names, **kwargs):
        stacked_reads.extend(names)
        return read_stacked(reader, names, **kwargs)

    monkeypatch.setattr(jaxpt.models, "load_array", load_array_watching_memory)
    monkeypatch.setattr(jaxpt.models, "load_stacked_array", load_stacked_array_noting_names)
    loaded = jaxpt.models.from_pretrained(tmp_path, mesh=mesh, quantization=kind)
    monkeypatch.undo()

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(loaded))[0]
    assert [path for path, _ in leaves] == [path for path, _ in expected_leaves]
    for (path, ours), (_, theirs) in zip(leaves, expected_leaves, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, path
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=str(path))
        if mesh is not None:
            assert ours.sharding == theirs.sharding, path
    assert {m.quantization for _, m in quantize._quantized_modules(loaded)} == \
        {quantize.quantization_settings(kind)}
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(expected(IDS)))

    quantized = dict(quantize._quantized_modules(expected))
    assert "model.layers.0.input_layernorm.weight" in stacked_reads  # (norms are read whole, as before)
    assert not [n for n in stacked_reads if n.endswith("_proj.weight")]  # no linear weight read whole in float
    scale_bytes = sum(m.weight_scale[...].nbytes for m in quantized.values())
    float_weights = [m.in_features * m.out_features * 4 for m in quantized.values()]  # one layer's, float32
    others = sum(leaf.nbytes for path, leaf in expected_leaves
                 if not any(path_name(path).startswith(f"{name}.") for name in quantized))
    # the float model's decoder weights (2 layers) are > 2 * max(float_weights): the bound below excludes them
    assert 2 * sum(float_weights) > max(float_weights) + 2 * scale_bytes
    assert 0 < peak <= others + 2 * scale_bytes + max(float_weights), (peak, others, scale_bytes)


def test_quantized_base_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="load_in_4bit=True quantizes the base model.*use_peft=True"):
        lora.LoraConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="choose one quantization"):
        lora.LoraConfig(use_peft=True, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='fp4' is not supported"):
        lora.LoraConfig(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="fp4")
    model = quantize.quantize_model(tiny_llama(VOCAB, **TINY), kind="int8")
    with pytest.raises(ValueError, match="base is quantized .* but it has no LoRA adapters"):
        TrainState.create(model, optax.sgd(0.1))
    with pytest.raises(ValueError, match="base is quantized \\(jaxpt.quantize\\): jaxpt saves float checkpoints"):
        jaxpt.models.save_pretrained(model, tmp_path / "quantized")
    with pytest.raises(ValueError, match="quantized as \\['int8'\\], but the config asks for 'nf4'"):
        lora.apply_lora(model, lora.LoraConfig(use_peft=True, load_in_4bit=True, lora_dropout=0.0))
    with pytest.raises(ValueError, match="in_features=32, not a multiple of the nf4 block size 64"):
        quantize.quantize_model(tiny_llama(VOCAB), kind="nf4")  # hidden 32
    with pytest.raises(ValueError, match="load_in_4bit=True quantizes"):  # the command line, before loading anything
        cli.main(["sft", "--model_name_or_path", str(tmp_path), "--dataset_name", str(tmp_path), "--output_dir",
                  str(tmp_path / "out"), "--load_in_4bit"])


# ---------------------------------------------------------------------------------------------------------------
# Training adapters on a quantized base
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qlora_base")
    TOKENIZER.save_pretrained(directory)
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, **TINY), directory)
    return directory


def test_sft_with_4bit_base_trains_the_adapters(tiny_dir, tmp_path):
    """QLoRA SFT on the 8-device FSDP mesh, gradient checkpointing on: the loss goes down, the packed base comes
    out bit-identical (no gradient, no optimizer state for it), and the adapter saved in `final/` loads back onto a
    4-bit base with the trained model's logits."""
    model = jaxpt.models.from_pretrained(tiny_dir)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, load_in_4bit=True, lora_r=8, lora_dropout=0.0,
                                           lora_target_modules=["all-linear"]))
    assert model.model.layers.mlp.up_proj.weight.dtype == jnp.uint8
    base = jax.tree.map(lambda x: np.array(x, copy=True), nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    config = sft.SFTConfig(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=1, logging_steps=5,
                           learning_rate=1e-2, max_steps=30, save_steps=0, disable_tqdm=True, seed=0,
                           completion_only_loss=False, gradient_checkpointing=True)
    result = sft.train(model, TOKENIZER, datasets.Dataset.from_list(arithmetic_texts(64)), config)

    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    state = result.state
    adapter_size = lora.adapter_parameter_count(model)
    assert sum(x.size for x in jax.tree.leaves(state.params)) == adapter_size
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * adapter_size + 16  # adamw: mu, nu
    frozen = jax.tree_util.tree_flatten_with_path(state.frozen)[0]
    expected = jax.tree_util.tree_flatten_with_path(base)[0]
    assert [path for path, _ in frozen] == [path for path, _ in expected]
    for (path, after), (_, before) in zip(frozen, expected, strict=True):
        assert after.dtype == before.dtype, path
        np.testing.assert_array_equal(np.asarray(after), before, err_msg=str(path))
    assert state.frozen["model"]["layers"]["mlp"]["up_proj"]["weight"][...].sharding.spec[2] == "fsdp"

    reloaded = quantize.quantize_model(jaxpt.models.from_pretrained(tiny_dir), kind="nf4")
    lora.load_adapter(reloaded, tmp_path / "final")
    trained_logits = np.asarray(state.model()(IDS))
    np.testing.assert_allclose(np.asarray(reloaded(IDS)), trained_logits, atol=1e-5)
    merged = jaxpt.models.merge_adapter(reloaded)  # onto the dequantized base, in float32: a plain model again
    assert merged.model.layers.mlp.up_proj.weight.dtype == jnp.float32 and not quantize.is_quantized(merged)
    np.testing.assert_allclose(np.asarray(merged(IDS)), trained_logits, atol=1e-4)


def test_sft_command_with_load_in_8bit(tiny_dir, tmp_path, monkeypatch):
    """--load_in_8bit quantizes while loading (`from_pretrained(..., quantization="int8")`), never after."""
    monkeypatch.setattr(quantize, "quantize_model", lambda *a, **k: pytest.fail("quantized after a float load"))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in arithmetic_texts(32)) + "\n")
    out = tmp_path / "out"
    assert cli.main(["sft", "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--max_steps", "12", "--logging_steps", "4", "--learning_rate", "0.02",
                     "--per_device_train_batch_size", "4", "--max_length", "16", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true", "--completion_only_loss", "false", "--use_peft", "--load_in_8bit",
                     "--lora_dropout", "0.0", "--lora_target_modules", "all-linear"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, records
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 16


def test_grpo_sampler_runs_the_adapters_on_the_quantized_base(tiny_dir):
    """The rollout samples with the adapted, quantized model (no merge): its log-probs are that model's, not the
    float base's nor the quantized base's without adapters."""
    from jaxpt import grpo
    from jaxpt.rollout import make_logps_fn, reference_params, sample_and_score

    model = jaxpt.models.from_pretrained(tiny_dir)
    lora.apply_lora(model, lora.LoraConfig(use_peft=True, load_in_4bit=True, lora_r=4, lora_dropout=0.0))
    state = TrainState.create(model, optax.sgd(0.1))
    state = state.replace(params=jax.tree.map(lambda x: x + 0.5, state.params))  # B != 0: the adapters act
    config = grpo.GRPOConfig(output_dir="unused", num_generations=4, per_device_train_batch_size=4,
                             max_completion_length=6, mesh_fsdp=1, disable_tqdm=True)
    prepared = [{"prompt": "ab", "prompt_ids": TOKENIZER("ab")["input_ids"], "columns": {}}]
    sampled = sample_and_score(state, prepared, [lambda completions, **kwargs: [0.0] * len(completions)], TOKENIZER,
                               config, key=jax.random.key(1), mesh=None, prompt_buckets=[8])
    valid = np.asarray(sampled.arrays["attention_mask"], bool)
    sampler_logps = sampled.arrays["sampler_logps"]
    # the train step's log-probs (`completion_logps`, jitted once for both parameter sets)
    logps = make_logps_fn(state.graphdef, temperature=1.0, chunk_size=1024, micro_batch=4)
    adapted = logps(state.full_params(), sampled.arrays)
    np.testing.assert_allclose(adapted[valid], sampler_logps[valid], atol=2e-5)
    without = logps(reference_params(state), sampled.arrays)
    assert np.abs(without - sampler_logps)[valid].max() > 0.1


def test_backward_pass_keeps_no_dequantized_copy_of_the_base():
    """Without gradient checkpointing, the compiled gradient of a bfloat16 QLoRA model needs no more temporary
    memory than LoRA on the float base, far from the extra bfloat16 linear weights that keeping every layer's
    dequantized copy would cost: the backward pass dequantizes each weight again (`dequantized_matmul`). Measured:
    21.3 MB float, 14.9 MB nf4, linear weights 8.4 MB in bfloat16 (before the plain backward saved only the matmuls'
    outputs: 46.4 MB float, 30.0 MB nf4)."""
    hf_config = tiny_llama_config(VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def temp_bytes(**quantization) -> tuple[int, int]:
        config = lora.LoraConfig(use_peft=True, lora_r=8, lora_dropout=0.0, lora_target_modules=["all-linear"],
                                 **quantization)
        model = nnx.eval_shape(lambda: lora.apply_lora(jaxpt.models.from_config(hf_config, dtype=jnp.bfloat16),
                                                       config))
        state = TrainState.create(model, optax.sgd(0.1))

        def loss(params, frozen, ids):
            return nnx.merge(state.graphdef, nnx.merge_state(frozen, params))(ids).astype(jnp.float32).mean()

        compiled = jax.jit(jax.grad(loss)).lower(state.params, state.frozen, ids).compile()
        linear = sum(2 * np.prod(m.weight.shape) for _, m in quantize._quantized_modules(model))
        return compiled.memory_analysis().temp_size_in_bytes, linear

    float_temp, bf16_linear_bytes = temp_bytes()  # the float model's linear weights, 2 bytes each
    nf4_temp, _ = temp_bytes(load_in_4bit=True)
    # The plain backward keeps only the weight matmuls' outputs (layers.scan_layers), so the float model holds no
    # weight copies either; a backward that kept each layer's dequantized weight would add bf16_linear_bytes.
    assert nf4_temp < float_temp + bf16_linear_bytes / 2, (float_temp, nf4_temp, bf16_linear_bytes)


def test_fsdp_gathers_the_packed_weights():
    """Under FSDP (8 devices) the compiled gradient all-gathers each layer's 4-bit weights as uint8 (a quarter of
    the bytes of a bfloat16 gather), and no float weight-sized array is gathered."""
    import re

    from jaxpt.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    hf_config = tiny_llama_config(VOCAB, hidden_size=128, intermediate_size=256)
    config = lora.LoraConfig(use_peft=True, lora_dropout=0.0, load_in_4bit=True)
    model = nnx.eval_shape(lambda: lora.apply_lora(jaxpt.models.from_config(hf_config, dtype=jnp.bfloat16), config))
    state = TrainState.create(model, optax.sgd(0.1), mesh=mesh)
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))

    def loss(params, frozen, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(state.graphdef, nnx.merge_state(frozen, params))(ids).astype(jnp.float32).mean()

    hlo = jax.jit(jax.grad(loss)).lower(state.params, state.frozen, ids).compile().as_text()
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo)
    packed = [shape for dtype, shape in gathered if dtype == "u8"]
    assert len(packed) >= 7, gathered  # q, k, v, o, gate, up, down (the backward may gather again)
    assert {"1,128,64", "1,256,64", "1,128,128"} <= set(packed)  # [layer, out, in / 2]
    weight_shapes = {(128, 128), (64, 128), (256, 128), (128, 256)}  # q/o, k/v, gate/up, down: [out, in]
    float_shapes = [tuple(int(d) for d in shape.split(",")) for dtype, shape in gathered if dtype != "u8"]
    assert not [shape for shape in float_shapes if shape[-2:] in weight_shapes], gathered  # scales, adapters, head
