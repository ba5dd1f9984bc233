"""Llama 2/3.x and Mistral ports: logits equal `transformers` (float32, 1e-4) in every calling mode."""

import numpy as np
import pytest
import transformers

import jaxpt.models
from tests.models import parity

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)

VARIANTS = {
    "llama": transformers.LlamaConfig(**TINY),
    # MQA, tied embeddings, biases, explicit head_dim different from hidden/heads.
    "llama_mqa_tied_bias": transformers.LlamaConfig(
        **{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=16
    ),
    "llama3_rope": transformers.LlamaConfig(**TINY, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "linear_rope": transformers.LlamaConfig(**TINY, rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                          factor=4.0)),
    # max_position_embeddings below the sequence length, so the dynamic NTK base really grows.
    "dynamic_rope": transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 24}, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "yarn_rope": transformers.LlamaConfig(**TINY, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)),
    "mistral_sliding": transformers.MistralConfig(**TINY, sliding_window=8),
}


def _hf_class(config):
    return transformers.MistralForCausalLM if config.model_type == "mistral" else transformers.LlamaForCausalLM


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    config = VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = parity.make_hf_checkpoint(_hf_class(config), config, directory)
    return request.param, hf_model, directory


def test_padded_logits_match_transformers(checkpoint):
    _, hf_model, directory = checkpoint
    model = jaxpt.models.from_pretrained(directory)
    parity.check_padded_logits(hf_model, model)


@pytest.mark.parametrize("name", ["llama", "llama_mqa_tied_bias", "mistral_sliding"])
def test_packed_segments_match_each_sequence_alone(name, tmp_path):
    config = VARIANTS[name]
    hf_model = parity.make_hf_checkpoint(_hf_class(config), config, tmp_path)
    model = jaxpt.models.from_pretrained(tmp_path)
    parity.check_packed_segments(hf_model, model)


def test_sliding_window_changes_logits(tmp_path):
    """The window really masks: Mistral with window 8 differs from the same weights without one."""
    config = VARIANTS["mistral_sliding"]
    parity.make_hf_checkpoint(transformers.MistralForCausalLM, config, tmp_path)
    windowed = jaxpt.models.from_pretrained(tmp_path)
    ids = parity.random_ids(config.vocab_size, (1, 30))
    full_config = transformers.MistralConfig(**TINY, sliding_window=None)
    full_dir = tmp_path / "full"
    parity.make_hf_checkpoint(transformers.MistralForCausalLM, full_config, full_dir)
    full = jaxpt.models.from_pretrained(full_dir)
    a, b = np.asarray(windowed(ids)), np.asarray(full(ids))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)  # inside the window: identical
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral_sliding"])
def test_sequence_classifier_matches_transformers(name, tmp_path):
    config = VARIANTS[name]
    config = config.__class__(**{**config.to_dict(), "num_labels": 3})
    hf_class = (transformers.MistralForSequenceClassification if config.model_type == "mistral"
                else transformers.LlamaForSequenceClassification)
    hf_classifier = parity.make_hf_checkpoint(hf_class, config, tmp_path)
    parity.check_classifier(hf_classifier, tmp_path, num_labels=3)


def test_causal_checkpoint_loads_as_classifier_with_fresh_head(tmp_path):
    """A causal-LM checkpoint loads as a reward model: backbone from the file, a new `score` head."""
    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, VARIANTS["llama"], tmp_path)
    reward_model = jaxpt.models.from_pretrained(tmp_path, num_labels=1)
    lm = jaxpt.models.from_pretrained(tmp_path)
    np.testing.assert_array_equal(reward_model.model.norm.weight[...], lm.model.norm.weight[...])
    ids = parity.random_ids(96, (2, 10))
    scores = np.asarray(reward_model(ids))
    assert scores.shape == (2, 1) and np.all(np.isfinite(scores)) and np.abs(scores).max() > 0


@pytest.mark.parametrize("name", ["llama", "llama_mqa_tied_bias", "mistral_sliding"])
def test_save_pretrained_roundtrip(name, tmp_path):
    config = VARIANTS[name]
    parity.make_hf_checkpoint(_hf_class(config), config, tmp_path / "in")
    model = jaxpt.models.from_pretrained(tmp_path / "in")
    parity.check_save_roundtrip(_hf_class(config), model, tmp_path / "out")


def test_fresh_model_saves_and_loads_in_transformers(tmp_path):
    """A model initialised in jaxpt (no torch involved) exports to a checkpoint transformers reads."""
    model = jaxpt.models.from_config(VARIANTS["llama"], seed=1)
    parity.check_save_roundtrip(transformers.LlamaForCausalLM, model, tmp_path)


def test_classifier_save_roundtrip(tmp_path):
    config = transformers.LlamaConfig(**TINY, num_labels=2)
    parity.make_hf_checkpoint(transformers.LlamaForSequenceClassification, config, tmp_path / "in")
    model = jaxpt.models.from_pretrained(tmp_path / "in", num_labels=2)
    jaxpt.models.save_pretrained(model, tmp_path / "out")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    ids, mask = parity.right_padded_batch(96, (12, 5), 12)
    parity.assert_close_on(model(ids, attention_mask=mask), parity.hf_logits(hf, ids, mask))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """Rematerialised decoder layers: identical loss and gradients, and the backward really recomputes them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, VARIANTS["llama"], tmp_path)
    ids, mask = parity.right_padded_batch(96, (20, 13), 20)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids, attention_mask=mask) ** 2)
        loops = jax.jit(jax.grad(loss)).lower(params).as_text().count("stablehlo.while")
        return jax.value_and_grad(loss)(params), jax.make_jaxpr(jax.grad(loss))(params), loops

    (plain, plain_grads), plain_jaxpr, plain_loops = loss_and_grads(jaxpt.models.from_pretrained(tmp_path))
    model = jaxpt.models.set_gradient_checkpointing(jaxpt.models.from_pretrained(tmp_path))
    (remat, remat_grads), remat_jaxpr, remat_loops = loss_and_grads(model)
    assert abs(float(remat) - float(plain)) < 1e-6  # the scanned, rematerialised forward may round differently
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Checkpointing recomputes the whole layer (no save policy); without it the weight matmuls' outputs and the
    # attention kernel's output are kept (layers.scan_layers), so the plain backward recomputes only the cheap rest
    # under a save policy, and never the kernel's forward loops (its query-block and key-block loops), which the
    # checkpointed backward runs again.
    assert "remat" in str(remat_jaxpr) and "policy=None" in str(remat_jaxpr)
    assert "policy=None" not in str(plain_jaxpr)
    assert plain_loops == remat_loops - 2, (plain_loops, remat_loops)
