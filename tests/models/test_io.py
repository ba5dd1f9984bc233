"""Checkpoint I/O: sharded indexes, dtypes, and clear errors for what cannot be loaded."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers

import jaxpt.models
from jaxpt.models.safetensors_io import INDEX_FILE, SafetensorsReader, save_file
from tests.models import parity

CONFIG = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_sharded_index_checkpoint_loads_and_saves(tmp_path):
    """transformers writes a multi-file index for a small max_shard_size; jaxpt reads it and writes one too."""
    hf_model = parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, tmp_path / "hf")
    hf_model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / INDEX_FILE).exists()
    model = jaxpt.models.from_pretrained(tmp_path / "hf_sharded")
    parity.check_padded_logits(hf_model, model)

    jaxpt.models.save_pretrained(model, tmp_path / "ours", max_shard_size=20_000)
    index = json.loads((tmp_path / "ours" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = parity.random_ids(96, (2, 12))
    parity.assert_close_on(model(ids), parity.hf_logits(reloaded, ids))


def test_bfloat16_checkpoint_roundtrip(tmp_path):
    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, tmp_path / "in")
    model = jaxpt.models.from_pretrained(tmp_path / "in")
    jaxpt.models.save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    reader = SafetensorsReader(tmp_path / "bf16")
    assert reader.get("model.norm.weight").dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = jaxpt.models.from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16)
    weight = reloaded.model.layers.mlp.up_proj.weight[...]  # [num_layers, out, in]
    assert weight.dtype == jnp.bfloat16 and weight.shape == (2, 64, 32)
    expected = np.asarray(model.model.layers.mlp.up_proj.weight[...]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(weight), expected)


def test_bfloat16_compute_close_to_float32(tmp_path):
    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, tmp_path)
    ids, mask = parity.right_padded_batch(96, (20, 13), 20)
    f32 = np.asarray(jaxpt.models.from_pretrained(tmp_path)(ids, attention_mask=mask))
    bf16_model = jaxpt.models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    bf16 = bf16_model(ids, attention_mask=mask)
    assert bf16.dtype == jnp.bfloat16
    assert bf16_model.model.norm.weight[...].dtype == jnp.float32  # master weights stay float32
    bf16 = np.asarray(bf16, np.float32)
    valid = mask.astype(bool)
    assert np.abs(bf16 - f32)[valid].max() < 0.05 * np.abs(f32).max()
    assert (bf16.argmax(-1) == f32.argmax(-1))[valid].mean() > 0.9
    assert not np.allclose(bf16, f32, atol=1e-6)  # it really ran in bfloat16


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*llama"):
        jaxpt.models.from_pretrained(tmp_path)


def test_missing_directory_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        jaxpt.models.from_pretrained(tmp_path / "nope")


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        jaxpt.models.from_pretrained("some-org/some-model-that-is-not-here")


def test_missing_weights_file_and_missing_tensor(tmp_path):
    CONFIG.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No safetensors weights"):
        jaxpt.models.from_pretrained(tmp_path)
    save_file({"model.norm.weight": np.ones(32, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 20 tensor.*lm_head.weight, model.embed_tokens.weight"):
        jaxpt.models.from_pretrained(tmp_path)


def test_shape_mismatch_is_reported(tmp_path):
    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        jaxpt.models.from_pretrained(tmp_path)


def test_stacked_layer_parameters_name_one_hf_tensor_per_layer():
    """`model.layers.X` `[num_layers, ...]` holds HF's `model.layers.{i}.X` in row i, one layer included."""
    names = jaxpt.models.hf_tensor_names
    assert names("model.layers.mlp.up_proj.weight", 2) == ["model.layers.0.mlp.up_proj.weight",
                                                           "model.layers.1.mlp.up_proj.weight"]
    assert names("model.layers.input_layernorm.weight", 1) == ["model.layers.0.input_layernorm.weight"]
    assert names("model.norm.weight", 2) == ["model.norm.weight"]
    assert names("lm_head.weight", 2) == ["lm_head.weight"]
