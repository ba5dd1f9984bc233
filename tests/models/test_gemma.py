"""Gemma 2 and Gemma 3 (text) ports: logits equal `transformers` (float32, 1e-4) in every calling mode."""

import dataclasses
import json

import numpy as np
import pytest
import transformers
from flax import nnx

import jaxpt.models
from jaxpt.losses.logprobs import chunked_token_logps, token_logps
from jaxpt.models import gemma
from tests.models import parity

# Two layers: one sliding-window layer, one global. Window 8 so the ~40-token test sequences need it;
# query_pre_attn_scalar != head_dim; initializer_range 0.2 (not 0.02) so attention scores are large enough
# for the attention soft-cap to change the logits (by ~0.5; at 0.02 it changes them by 2e-7).
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, sliding_window=8,
            query_pre_attn_scalar=24, initializer_range=0.2)

VARIANTS = {
    "gemma2": (transformers.Gemma2Config, dict(**TINY, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # MQA, untied embeddings, attention biases, head_dim 8.
    "gemma2_untied_mqa_bias": (transformers.Gemma2Config, dict(
        **{**TINY, "num_key_value_heads": 1, "head_dim": 8}, tie_word_embeddings=False, attention_bias=True,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # q/k norms; sliding layers use the local base frequency, global ones a linearly scaled rope. transformers'
    # Gemma 3 ignores attn_logit_softcapping, so setting it pins that the port ignores it too.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        **TINY, sliding_window_pattern=2, rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=2.0),
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}

CAUSAL_LM = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3_text": transformers.Gemma3ForCausalLM}
CLASSIFIER = {"gemma2": transformers.Gemma2ForSequenceClassification,
              "gemma3_text": transformers.Gemma3TextForSequenceClassification}


def make_config(name, **changes):
    config_class, kwargs = VARIANTS[name]
    return config_class(**{**kwargs, **changes})


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    config = make_config(request.param)
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = parity.make_hf_checkpoint(CAUSAL_LM[config.model_type], config, directory)
    return request.param, hf_model, jaxpt.models.from_pretrained(directory)


def test_padded_logits_match_transformers(checkpoint):
    _, hf_model, model = checkpoint
    parity.check_padded_logits(hf_model, model)


def test_packed_segments_match_each_sequence_alone(checkpoint):
    _, hf_model, model = checkpoint
    parity.check_packed_segments(hf_model, model)


def _with_config(model, **changes):
    """The same weights under a changed `GemmaConfig`."""
    other = gemma.GemmaForCausalLM(dataclasses.replace(model.config, **changes), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


@pytest.mark.parametrize("checkpoint", ["gemma2", "gemma3"], indirect=True)
def test_softcaps_window_and_local_rope_change_logits(checkpoint):
    """Each Gemma feature moves the logits, so matching transformers above really tests it."""
    name, _, model = checkpoint
    ids = parity.random_ids(96, (3, 40))  # the shape check_padded_logits compiled
    logits = np.asarray(model(ids))
    assert np.abs(logits).max() < 3.0  # final_logit_softcapping = 3
    changes = {"final_logit_softcapping": None, "sliding_window": None}
    if name.startswith("gemma2"):
        changes["attn_logit_softcapping"] = None
    else:
        changes["sliding_rope"] = model.config.rope
    for field, value in changes.items():
        changed = np.asarray(_with_config(model, **{field: value})(ids))
        assert np.abs(changed - logits).max() > 0.1, field


@pytest.mark.parametrize("checkpoint", ["gemma2"], indirect=True)
def test_chunked_logps_apply_final_softcap(checkpoint):
    """`hidden_states` + `lm_head_weight` + `final_logit_softcap` give the log-probs of the full logits."""
    _, _, model = checkpoint
    ids = parity.random_ids(96, (3, 40))
    expected = token_logps(model(ids), ids)
    actual = chunked_token_logps(model.hidden_states(ids), model.lm_head_weight(), ids, chunk_size=48,
                                 logit_softcap=model.final_logit_softcap)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_sequence_classifier_matches_transformers(name, tmp_path):
    config = make_config(name, num_labels=3)
    hf_classifier = parity.make_hf_checkpoint(CLASSIFIER[config.model_type], config, tmp_path)
    parity.check_classifier(hf_classifier, tmp_path, num_labels=3)


@pytest.mark.parametrize("name", ["gemma2_untied_mqa_bias", "gemma3"])
def test_save_pretrained_roundtrip(name, tmp_path):
    """Saved checkpoints load in transformers' Auto class as the right model, with the same logits."""
    config = make_config(name)
    parity.make_hf_checkpoint(CAUSAL_LM[config.model_type], config, tmp_path / "in")
    model = jaxpt.models.from_pretrained(tmp_path / "in")
    parity.check_save_roundtrip(transformers.AutoModelForCausalLM, model, tmp_path / "out")
    hf_class = CAUSAL_LM[config.model_type]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [hf_class.__name__]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is hf_class


def test_fresh_gemma3_classifier_saves_and_loads_in_transformers(tmp_path):
    """A classifier initialised in jaxpt exports to a checkpoint that AutoModelForSequenceClassification loads
    as Gemma3TextForSequenceClassification with the same scores."""
    model = jaxpt.models.from_config(make_config("gemma3"), num_labels=2, seed=1)
    jaxpt.models.save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf) is transformers.Gemma3TextForSequenceClassification
    ids, mask = parity.right_padded_batch(96, (12, 5), 12)
    parity.assert_close_on(model(ids, attention_mask=mask), parity.hf_logits(hf, ids, mask))


@pytest.mark.parametrize("config_class", [transformers.Gemma2Config, transformers.Gemma3TextConfig])
def test_bidirectional_attention_is_rejected(config_class):
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        jaxpt.models.from_config(config_class(**TINY, use_bidirectional_attention=True))
