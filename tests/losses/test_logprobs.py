"""Token log-probs: exact against float64 numpy; chunked log-probs equal the full-logits ones (values and
gradients) and never hold the full logits buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.logprobs import (
    TOKEN_STATS,
    chunked_token_logps,
    chunked_token_logps_and_stats,
    entropy_from_logits,
    masked_mean,
    next_token_targets,
    token_logps,
    weighted_nll_from_hidden,
)
from jaxpt.models.layers import project_to_vocab


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_logps_equals_log_softmax_gather():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 7, 50).astype(np.float32) * 3
    targets = rng.randint(0, 50, (3, 7))
    expected = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logps(logits, targets), expected, atol=1e-5)
    expected_t = np.take_along_axis(np_log_softmax(logits / 0.7), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logps(logits, targets, temperature=0.7), expected_t, atol=1e-5)


def test_token_logps_is_float32_for_bfloat16_logits():
    logits = jnp.asarray(np.random.RandomState(1).randn(2, 4, 16), jnp.bfloat16)
    assert token_logps(logits, jnp.zeros((2, 4), jnp.int32)).dtype == jnp.float32


def test_entropy_from_logits():
    logits = np.random.RandomState(2).randn(2, 5, 11)
    logp = np_log_softmax(logits)
    np.testing.assert_allclose(entropy_from_logits(logits), -(np.exp(logp) * logp).sum(-1), atol=1e-5)


def test_next_token_targets_shift_and_mask():
    ids = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    targets, target_mask = next_token_targets(ids, mask)
    np.testing.assert_array_equal(targets, [[6, 7, 0, 0], [9, 0, 0, 0]])
    np.testing.assert_array_equal(target_mask, [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_masked_mean_ignores_masked_values_and_empty_mask():
    values = jnp.array([[1.0, 2.0, 100.0], [3.0, 50.0, 60.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(masked_mean(values, mask)) == pytest.approx(2.0)
    np.testing.assert_allclose(masked_mean(values, mask, axis=1), [1.5, 3.0])
    assert float(masked_mean(values, jnp.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.8)])
def test_chunked_logps_equal_full_logits_values_and_gradients(softcap, temperature):
    rng = np.random.RandomState(3)
    batch, seq, hidden, vocab = 3, 10, 16, 40  # 30 tokens: chunks of 8 leave a ragged last chunk
    hidden_states = jnp.asarray(rng.randn(batch, seq, hidden), jnp.float32)
    weight = jnp.asarray(rng.randn(vocab, hidden) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.randint(0, vocab, (batch, seq)))
    weights = jnp.asarray(rng.rand(batch, seq), jnp.float32)  # a non-uniform cotangent

    def full(h, w):
        logits = project_to_vocab(h, w, logit_softcap=softcap)
        return token_logps(logits, targets, temperature=temperature)

    def chunked(h, w):
        return chunked_token_logps(h, w, targets, chunk_size=8, logit_softcap=softcap, temperature=temperature)

    np.testing.assert_allclose(chunked(hidden_states, weight), full(hidden_states, weight), atol=1e-5)
    grad_full = jax.grad(lambda h, w: jnp.sum(full(h, w) * weights), argnums=(0, 1))(hidden_states, weight)
    grad_chunked = jax.grad(lambda h, w: jnp.sum(chunked(h, w) * weights), argnums=(0, 1))(hidden_states, weight)
    for a, b in zip(grad_chunked, grad_full, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5)

    _, entropy = chunked_token_logps(hidden_states, weight, targets, chunk_size=8, logit_softcap=softcap,
                                     temperature=temperature, return_entropy=True)
    logits = project_to_vocab(hidden_states, weight, logit_softcap=softcap)
    np.testing.assert_allclose(entropy, entropy_from_logits(logits, temperature=temperature), atol=1e-5)


def test_chunked_logps_bfloat16_hidden_states_close_to_float32():
    rng = np.random.RandomState(4)
    hidden_states = jnp.asarray(rng.randn(2, 8, 16), jnp.float32)
    weight = jnp.asarray(rng.randn(32, 16) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.randint(0, 32, (2, 8)))
    f32 = chunked_token_logps(hidden_states, weight, targets, chunk_size=4)
    bf16 = chunked_token_logps(hidden_states.astype(jnp.bfloat16), weight, targets, chunk_size=4)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.1)


def test_chunked_logps_never_hold_the_full_logits_buffer():
    """Compiled memory of loss+gradient: the full-logits path needs >= one [tokens, vocab] float32 buffer;
    the chunked path stays far below it."""
    batch, seq, hidden, vocab = 4, 256, 64, 8192
    full_logits_bytes = batch * seq * vocab * 4  # 32 MiB
    h = jax.ShapeDtypeStruct((batch, seq, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    t = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def full_loss(h, w, t):
        return -jnp.mean(token_logps(project_to_vocab(h, w), t))

    def chunked_loss(h, w, t):
        return -jnp.mean(chunked_token_logps(h, w, t, chunk_size=128))

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, t).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(full_loss), temp_bytes(chunked_loss)
    assert full >= full_logits_bytes
    assert chunked < full_logits_bytes / 3, (chunked, full_logits_bytes)  # ~2 chunk-sized [128, vocab] buffers


@pytest.mark.parametrize("softcap,temperature,prob_weighted",
                         [(None, 1.0, False), (3.0, 0.7, False), (None, 1.0, True)])
def test_weighted_nll_from_hidden_equals_full_logits(softcap, temperature, prob_weighted):
    """The fused loss (gradients computed in the forward pass) equals -sum(w * logp) on full logits: value,
    metrics and gradients; with prob_weighted, the DFT weighting by stop_gradient(p)."""
    rng = np.random.RandomState(5)
    batch, seq, hidden, vocab = 2, 11, 16, 40
    hidden_states = jnp.asarray(rng.randn(batch, seq, hidden), jnp.float32)
    weight = jnp.asarray(rng.randn(vocab, hidden) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.randint(0, vocab, (batch, seq)))
    token_weights = jnp.asarray(rng.rand(batch, seq) * (rng.rand(batch, seq) > 0.3), jnp.float32)

    def reference(h, w):
        logps = token_logps(project_to_vocab(h, w, logit_softcap=softcap), targets, temperature=temperature)
        scale = token_weights * jax.lax.stop_gradient(jnp.exp(logps)) if prob_weighted else token_weights
        return -jnp.sum(scale * logps), logps

    def fused(h, w):
        loss, per_token = weighted_nll_from_hidden(h, w, targets, token_weights, chunk_size=8,
                                                   logit_softcap=softcap, temperature=temperature,
                                                   prob_weighted=prob_weighted)
        return loss, per_token["logps"]

    (loss, logps), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hidden_states, weight)
    (ref_loss, ref_logps), ref_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(hidden_states,
                                                                                                   weight)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    np.testing.assert_allclose(logps, ref_logps, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5)
    _, per_token = weighted_nll_from_hidden(hidden_states, weight, targets, token_weights, chunk_size=8,
                                            logit_softcap=softcap, temperature=temperature, with_metrics=True)
    logits = project_to_vocab(hidden_states, weight, logit_softcap=softcap) / temperature
    np.testing.assert_allclose(per_token["entropy"], entropy_from_logits(logits), atol=1e-5)
    np.testing.assert_array_equal(per_token["is_argmax"], np.asarray(jnp.argmax(logits, -1) == targets, np.float32))
    # Scaling the loss scales the gradients (the saved gradients are multiplied by the cotangent).
    grads3 = jax.grad(lambda h, w: 3.0 * fused(h, w)[0], argnums=(0, 1))(hidden_states, weight)
    np.testing.assert_allclose(grads3[0], 3.0 * grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_logps_and_stats_against_numpy(softcap):
    """Per-token statistics in the same pass (float64 numpy from full logits); the log-probs and their gradient
    are those of `chunked_token_logps`."""
    rng = np.random.RandomState(5)
    hidden_states = jnp.asarray(rng.randn(2, 9, 16), jnp.float32)
    weight = jnp.asarray(rng.randn(40, 16) * 0.5, jnp.float32)
    logits = np.asarray(project_to_vocab(hidden_states, weight, logit_softcap=softcap), np.float64)
    logp_all = np_log_softmax(logits)
    targets_np = rng.randint(0, 40, (2, 9))
    targets_np[0, :3] = logits[0, :3].argmax(-1)  # some top-1 hits
    stats = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    targets = jnp.asarray(targets_np)
    logps, per_token = chunked_token_logps_and_stats(hidden_states, weight, targets, stats=stats, chunk_size=4,
                                                     logit_softcap=softcap)
    np.testing.assert_allclose(logps, np.take_along_axis(logp_all, targets_np[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(per_token["entropy"], -(np.exp(logp_all) * logp_all).sum(-1), atol=1e-5)
    np.testing.assert_allclose(per_token["mean_logits"], logits.mean(-1), atol=1e-5)
    np.testing.assert_array_equal(per_token["is_top1"], (logits.argmax(-1) == targets_np) * 1.0)
    assert per_token["is_top1"][0, :3].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(per_token["log_sum_sq_probs"], np.log((np.exp(logp_all) ** 2).sum(-1)), atol=1e-5)

    weights = jnp.asarray(rng.rand(2, 9), jnp.float32)
    grad = jax.grad(lambda h: jnp.sum(chunked_token_logps_and_stats(h, weight, targets, chunk_size=4,
                                                                    logit_softcap=softcap)[0] * weights))
    expected = jax.grad(lambda h: jnp.sum(chunked_token_logps(h, weight, targets, chunk_size=4,
                                                              logit_softcap=softcap) * weights))
    np.testing.assert_allclose(grad(hidden_states), expected(hidden_states), atol=1e-6)
    with pytest.raises(ValueError, match="unknown \\['logits'\\]"):
        chunked_token_logps_and_stats(hidden_states, weight, targets, stats=("logits",))


@pytest.mark.parametrize("chunk_size", [1, 12, 1000])
def test_chunk_length_and_sequence_padding_do_not_change_results(chunk_size):
    """3 rows of 10 tokens: `chunk_size // rows` positions per chunk (1; 4, the sequence padded to 12; all 10)
    give the full-logits values and gradients."""
    rng = np.random.RandomState(6)
    hidden_states = jnp.asarray(rng.randn(3, 10, 16), jnp.float32)
    weight = jnp.asarray(rng.randn(40, 16) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.randint(0, 40, (3, 10)))
    token_weights = jnp.asarray(rng.rand(3, 10), jnp.float32)

    def full(h, w):
        logps = token_logps(project_to_vocab(h, w), targets)
        return -jnp.sum(logps * token_weights), logps

    def chunked(h, w):
        return -jnp.sum(chunked_token_logps(h, w, targets, chunk_size=chunk_size) * token_weights), None

    def fused(h, w):
        loss, per_token = weighted_nll_from_hidden(h, w, targets, token_weights, chunk_size=chunk_size)
        return loss, per_token["logps"]

    (ref_loss, ref_logps), ref_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden_states, weight)
    for loss_fn in (chunked, fused):
        (loss, logps), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(hidden_states, weight)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        if logps is not None:
            np.testing.assert_allclose(logps, ref_logps, atol=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mesh_shape,rows", [((1, 8, 1), 8), ((2, 2, 2), 8), ((1, 8, 1), 6)],
                         ids=["fsdp8", "2x2x2", "rows_not_divisible"])
def test_data_parallel_under_a_mesh_equals_no_mesh(mesh_shape, rows):
    """Under a mesh each device computes its own rows (shard_map over the batch axes); values and gradients
    equal the computation without a mesh. Rows the batch axes do not divide run unsplit (same numbers)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxpt.sharding import make_mesh

    rng = np.random.RandomState(7)
    hidden_states = jnp.asarray(rng.randn(rows, 12, 16), jnp.float32)
    weight = jnp.asarray(rng.randn(40, 16) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.randint(0, 40, (rows, 12)))
    token_weights = jnp.asarray(rng.rand(rows, 12), jnp.float32)
    cotangent = jnp.asarray(rng.randn(rows, 12), jnp.float32)

    def everything(h, w):
        logps, entropy = chunked_token_logps(h, w, targets, chunk_size=8, return_entropy=True)
        stats_logps, stats = chunked_token_logps_and_stats(h, w, targets, chunk_size=8, stats=TOKEN_STATS)
        loss, per_token = weighted_nll_from_hidden(h, w, targets, token_weights, chunk_size=8, with_metrics=True)
        objective = jnp.sum(logps * cotangent) + jnp.sum(stats_logps * cotangent ** 2) + 3.0 * loss
        return objective, (logps, entropy, stats, per_token)

    grad_fn = jax.value_and_grad(everything, argnums=(0, 1), has_aux=True)
    expected = jax.jit(grad_fn)(hidden_states, weight)

    mesh = make_mesh(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    divides = rows % (mesh_shape[0] * mesh_shape[1]) == 0
    rows_spec = PartitionSpec(("data", "fsdp")) if divides else PartitionSpec()

    def in_mesh(h, w):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return grad_fn(h, w)

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert ("shard_map" in str(jax.make_jaxpr(grad_fn)(hidden_states, weight))) == divides
    sharded = jax.jit(in_mesh, in_shardings=(NamedSharding(mesh, rows_spec),
                                             NamedSharding(mesh, PartitionSpec("tensor", "fsdp"))))
    got = sharded(hidden_states, weight)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got), jax.tree.leaves(expected),
                          strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path[0]))
    assert float(jnp.abs(got[1][1]).max()) > 1e-3  # the weight gradient is not trivially zero


def test_entropy_gradient_through_the_chunked_backward_matches_dense_autodiff():
    """`entropy_gradient=True` (GRPO's entropy bonus): the chunked backward pass adds dH/dlogits, equal to
    differentiating the entropy of full logits (with temperature); without it the entropy is a metric (no gradient)."""
    from jaxpt.losses.logprobs import chunked_token_logps

    hidden = jax.random.normal(jax.random.key(0), (3, 5, 4))
    weight = jax.random.normal(jax.random.key(1), (11, 4))
    targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 11)
    logp_weights, entropy_weights = jax.random.normal(jax.random.key(3), (2, 3, 5))

    def chunked(hidden, weight, entropy_gradient):
        logps, entropy = chunked_token_logps(hidden, weight, targets, chunk_size=4, temperature=0.7,
                                             return_entropy=True, entropy_gradient=entropy_gradient)
        return jnp.sum(logps * logp_weights) + jnp.sum(entropy * entropy_weights)

    def dense(hidden, weight, with_entropy=True):
        log_probs = jax.nn.log_softmax(jnp.einsum("bsh,vh->bsv", hidden, weight) / 0.7)
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        logps = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(logps * logp_weights) + with_entropy * jnp.sum(entropy * entropy_weights)

    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, weight, True), jax.grad(dense, (0, 1))(hidden, weight),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    metric_only = jax.grad(chunked, (0, 1))(hidden, weight, False)
    for got, want in zip(metric_only, jax.grad(lambda h, w: dense(h, w, False), (0, 1))(hidden, weight), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
