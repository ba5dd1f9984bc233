"""Qwen3 port: logits equal `transformers` (float32, 1e-4) in every calling mode."""

import dataclasses

import numpy as np
import pytest
import transformers

import jaxpt.models
from tests.models import parity

# initializer_range 0.1 (not 0.02): with q/k norms and 0.02 weights attention barely moves the logits (the window
# changed them by ~1e-4), so a port that got attention wrong could still pass the 1e-4 bar.
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.1)

VARIANTS = {
    # GQA, untied embeddings, head_dim 16 != hidden / heads (as in real Qwen3 checkpoints).
    "qwen3": transformers.Qwen3Config(**TINY, head_dim=16),
    # MQA, tied embeddings, attention_bias (q/k/v/o), and a window of 8 on layers >= max_window_layers:
    # [full, slide, slide].
    "qwen3_mqa_tied_bias_sliding": transformers.Qwen3Config(
        **{**TINY, "num_key_value_heads": 1, "num_hidden_layers": 3}, head_dim=8, tie_word_embeddings=True,
        attention_bias=True, use_sliding_window=True, sliding_window=8, max_window_layers=1,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, checkpoint directory, jaxpt model), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            hf_model = parity.make_hf_checkpoint(transformers.Qwen3ForCausalLM, VARIANTS[name], directory)
            built[name] = hf_model, directory, jaxpt.models.from_pretrained(directory)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_padded_logits_match_transformers(name, checkpoints):
    hf_model, _, model = checkpoints(name)
    parity.check_padded_logits(hf_model, model)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_segments_match_each_sequence_alone(name, checkpoints):
    hf_model, _, model = checkpoints(name)
    parity.check_packed_segments(hf_model, model)


def test_qk_norms_and_attention_biases_are_loaded(checkpoints):
    hf_model, _, model = checkpoints("qwen3_mqa_tied_bias_sliding")
    layers = model.model.layers  # stacked: row i is HF's layer i
    for index, hf_layer in enumerate(hf_model.model.layers):
        for module in ("q_norm", "k_norm", "q_proj", "k_proj", "v_proj", "o_proj"):
            param = "weight" if module.endswith("norm") else "bias"
            expected = getattr(getattr(hf_layer.self_attn, module), param).detach().numpy()
            assert np.abs(expected - (1.0 if param == "weight" else 0.0)).max() > 0.01  # not HF's init values
            actual = getattr(getattr(layers.self_attn, module), param)[...][index]
            np.testing.assert_array_equal(np.asarray(actual), expected)
    assert layers.mlp.gate_proj.bias is None
    _, _, unbiased = checkpoints("qwen3")
    assert unbiased.model.layers.self_attn.q_proj.bias is None


def test_sliding_window_only_on_sliding_layers(checkpoints):
    """`layer_types` decides which layers slide, and the window really masks (so the parity above can fail)."""
    _, directory, model = checkpoints("qwen3_mqa_tied_bias_sliding")
    assert model.model.sliding_windows() == (None, 8, 8)
    full = jaxpt.models.from_pretrained(directory)
    full.model.config = dataclasses.replace(full.model.config, sliding_window=None)
    assert full.model.sliding_windows() == (None, None, None)
    ids = parity.random_ids(96, (1, 30))
    a, b = np.asarray(model(ids)), np.asarray(full(ids))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)  # inside the window: identical
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


def test_sequence_classifier_matches_transformers(tmp_path):
    config = VARIANTS["qwen3_mqa_tied_bias_sliding"]
    config = config.__class__(**{**config.to_dict(), "num_labels": 3})
    hf_classifier = parity.make_hf_checkpoint(transformers.Qwen3ForSequenceClassification, config, tmp_path)
    parity.check_classifier(hf_classifier, tmp_path, num_labels=3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_pretrained_roundtrip(name, checkpoints, tmp_path):
    _, _, model = checkpoints(name)
    parity.check_save_roundtrip(transformers.Qwen3ForCausalLM, model, tmp_path)
