"""Parity checks shared by every family's tests: jaxpt vs `transformers` (PyTorch CPU, float32).

Each check builds inputs, runs both models and asserts the max abs difference of the logits on real tokens
is within `TOL` (the DESIGN's 1e-4 bar).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

import jaxpt.models

TOL = 1e-4


def make_hf_checkpoint(hf_class, hf_config, directory, *, seed: int = 0):
    """A randomly initialised `transformers` model saved to `directory`; returns the (eval-mode) model.

    HF initialises norms to one (or zero) and biases to zero; both are randomised here so a port that
    ignores a norm or a bias fails parity. Test configs also use a large `initializer_range` (0.1-0.2):
    with HF's 0.02, attention scores are so small that a wrong mask, window or soft-cap moves the logits by
    less than the 1e-4 bar.
    """
    torch.manual_seed(seed)
    model = hf_class(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def random_ids(vocab_size: int, shape, seed: int = 0) -> np.ndarray:
    # Avoid id 0, which tiny configs often use as the pad token.
    return np.random.RandomState(seed).randint(1, vocab_size, size=shape).astype(np.int32)


def right_padded_batch(vocab_size: int, lengths, seq: int, seed: int = 0):
    ids = random_ids(vocab_size, (len(lengths), seq), seed)
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


def hf_logits(hf_model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
        return hf_model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()


def assert_close_on(actual, expected, mask=None, tol=TOL):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if mask is not None:
        actual, expected = actual[mask.astype(bool)], expected[mask.astype(bool)]
    error = float(np.max(np.abs(actual - expected)))
    assert error <= tol, f"max abs difference {error:.3g} > {tol}"
    return error


def check_padded_logits(hf_model, model, *, lengths=(40, 25, 7), seq=40):
    """Right-padded batch: logits on real tokens equal HF's with the same attention mask."""
    ids, mask = right_padded_batch(hf_model.config.vocab_size, lengths, seq)
    expected = hf_logits(hf_model, ids, mask)
    actual = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return assert_close_on(actual, expected, mask)


def check_packed_segments(hf_model, model, *, lengths=(13, 20, 7), seq=48):
    """One row packing several sequences (`segment_ids`, trailing padding = 0): each segment's logits equal
    HF's run on that sequence alone (positions restart per segment, no attention across segments)."""
    vocab = hf_model.config.vocab_size
    pieces = [random_ids(vocab, (1, n), seed=i + 1) for i, n in enumerate(lengths)]
    ids = np.zeros((1, seq), np.int32)
    segment_ids = np.zeros((1, seq), np.int32)
    start = 0
    for i, piece in enumerate(pieces):
        ids[0, start : start + piece.shape[1]] = piece[0]
        segment_ids[0, start : start + piece.shape[1]] = i + 1
        start += piece.shape[1]
    packed = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(segment_ids)))
    errors = []
    start = 0
    for piece in pieces:
        n = piece.shape[1]
        expected = hf_logits(hf_model, piece)
        errors.append(assert_close_on(packed[:, start : start + n], expected))
        start += n
    return max(errors)


def check_classifier(hf_classifier, directory, *, num_labels: int, lengths=(30, 17, 4), seq=30):
    """`from_pretrained(num_labels=...)` scores equal `*ForSequenceClassification` on a right-padded batch."""
    model = jaxpt.models.from_pretrained(directory, num_labels=num_labels)
    ids, mask = right_padded_batch(hf_classifier.config.vocab_size, lengths, seq)
    ids = np.where(mask == 1, ids, hf_classifier.config.pad_token_id)
    expected = hf_logits(hf_classifier, ids, mask)
    actual = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert actual.shape == (len(lengths), num_labels)
    return assert_close_on(actual, expected)


def check_save_roundtrip(hf_class, model, directory):
    """`save_pretrained` -> `transformers` `from_pretrained` gives the jaxpt model's logits."""
    jaxpt.models.save_pretrained(model, directory)
    reloaded = hf_class.from_pretrained(directory).eval()
    ids, mask = right_padded_batch(reloaded.config.vocab_size, (24, 11), 24, seed=3)
    expected = hf_logits(reloaded, ids, mask)
    actual = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return assert_close_on(actual, expected, mask)
