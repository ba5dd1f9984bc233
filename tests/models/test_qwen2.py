"""Qwen2 / Qwen2.5 port: logits equal `transformers` (float32, 1e-4) in every calling mode."""

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
    "qwen2": transformers.Qwen2Config(**TINY),  # GQA, untied embeddings
    # MQA, tied embeddings (as Qwen2.5-0.5B), and a window of 8 on layers >= max_window_layers: [full, slide, slide].
    "qwen2_mqa_tied_sliding": transformers.Qwen2Config(
        **{**TINY, "num_key_value_heads": 1, "num_hidden_layers": 3}, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, checkpoint directory, jaxpt model), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            hf_model = parity.make_hf_checkpoint(transformers.Qwen2ForCausalLM, VARIANTS[name], directory)
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


def test_qkv_biases_are_loaded(checkpoints):
    hf_model, _, model = checkpoints("qwen2")
    layers = model.model.layers  # stacked: row i is HF's layer i
    for index, hf_layer in enumerate(hf_model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            expected = getattr(hf_layer.self_attn, proj).bias.detach().numpy()
            assert np.abs(expected).max() > 0.1
            np.testing.assert_array_equal(np.asarray(getattr(layers.self_attn, proj).bias[...][index]), expected)
    assert layers.self_attn.o_proj.bias is None and layers.mlp.gate_proj.bias is None


def test_sliding_window_only_on_sliding_layers(checkpoints):
    """`layer_types` decides which layers slide, and the window really masks (so the parity above can fail)."""
    _, directory, model = checkpoints("qwen2_mqa_tied_sliding")
    assert model.model.sliding_windows() == (None, 8, 8)
    full = jaxpt.models.from_pretrained(directory)
    full.model.config = dataclasses.replace(full.model.config, sliding_window=None)
    assert full.model.sliding_windows() == (None, None, None)
    ids = parity.random_ids(96, (1, 30))
    a, b = np.asarray(model(ids)), np.asarray(full(ids))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)  # inside the window: identical
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


def test_sequence_classifier_matches_transformers(tmp_path):
    config = VARIANTS["qwen2_mqa_tied_sliding"]
    config = config.__class__(**{**config.to_dict(), "num_labels": 3})
    hf_classifier = parity.make_hf_checkpoint(transformers.Qwen2ForSequenceClassification, config, tmp_path)
    parity.check_classifier(hf_classifier, tmp_path, num_labels=3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_pretrained_roundtrip(name, checkpoints, tmp_path):
    _, _, model = checkpoints(name)
    parity.check_save_roundtrip(transformers.Qwen2ForCausalLM, model, tmp_path)
