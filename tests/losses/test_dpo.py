"""DPO losses against the formulas of the papers (as TRL 1.16 implements them), written out in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.dpo import (
    DPO_LOSS_TYPES,
    completion_token_metrics,
    dpo_loss,
    ld_sequence_logps,
    wpo_weights,
)

BETA = 0.3


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def pairs(batch=6, seed=0):
    """Policy and reference sequence log-probs, completion lengths and a chosen-token NLL setup."""
    rng = np.random.RandomState(seed)
    chosen = -rng.uniform(5, 30, batch)
    rejected = -rng.uniform(5, 30, batch)
    ref_chosen = chosen + rng.randn(batch) * 2
    ref_rejected = rejected + rng.randn(batch) * 2
    chosen_lengths = rng.randint(1, 20, batch).astype(np.float64)
    rejected_lengths = rng.randint(1, 20, batch).astype(np.float64)
    return chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths


def score(logratio, divergence="reverse_kl", alpha=0.5):
    """f'(t) at t = exp(logratio) for the f-divergences of f-DPO (Wang et al. 2023)."""
    t = np.exp(logratio)
    if divergence == "reverse_kl":  # f(t) = t log t
        return np.log(t)
    if divergence == "forward_kl":  # f(t) = -log t
        return 1.0 - 1.0 / t
    if divergence == "js_divergence":  # f(t) = t log t - (t + 1) log((t + 1) / 2)
        return np.log(2.0 * t / (t + 1.0))
    return (t ** (alpha - 1.0) - 1.0) / (alpha - 1.0)  # alpha_divergence


def reference_per_pair(loss_type, chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, *,
                       beta=BETA, eps=0.0, divergence="reverse_kl", alpha=0.5, tau=0.05):
    c, r = chosen - ref_chosen, rejected - ref_rejected
    sc, sr = score(c, divergence, alpha), score(r, divergence, alpha)
    d = sc - sr
    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023, Eq. 7
        return -log_sigmoid(beta * d)
    if loss_type == "hinge":  # SLiC-HF
        return np.maximum(0.0, 1.0 - beta * d)
    if loss_type == "ipo":  # IPO, Azar et al. 2023, Eq. 17, on per-token averages
        return (sc / chosen_lengths - sr / rejected_lengths - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":  # EXO: KL(p_theta || p_target) over {chosen, rejected}
        p = np.stack([sigmoid(beta * d), sigmoid(-beta * d)])
        q = np.stack([np.full_like(d, 1.0 - eps), np.full_like(d, eps)])
        return np.sum(p * np.log(p / q), axis=0)
    if loss_type == "nca_pair":  # NCA, Chen et al. 2024
        return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)
    if loss_type == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under label flips with probability eps
        return ((1.0 - eps) * -log_sigmoid(beta * d) - eps * -log_sigmoid(-beta * d)) / (1.0 - 2.0 * eps)
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * c) - log_sigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1.0 / (2.0 * beta)) ** 2 + (r + 1.0 / (2.0 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):  # AOT: match the sorted (not the paired) margins
        if loss_type == "aot":
            delta = np.sort(chosen - rejected) - np.sort(ref_chosen - ref_rejected)
        else:
            delta = np.sort(c) - np.sort(r)
        return -(1.0 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    if loss_type == "apo_zero":
        return (1.0 - sigmoid(beta * c)) + sigmoid(beta * r)
    if loss_type == "apo_down":
        return sigmoid(beta * c) + (1.0 - sigmoid(beta * (c - r)))
    if loss_type == "discopop":
        x = beta * d
        mix = sigmoid(x / tau)
        return (1.0 - mix) * np.log1p(np.exp(-x)) + mix * np.exp(-x)
    if loss_type == "sft":  # the chosen NLL averaged over all chosen tokens of the batch
        return np.full_like(c, -chosen.sum() / chosen_lengths.sum())
    if loss_type == "sigmoid_norm":
        return -log_sigmoid(beta * (sc / chosen_lengths - sr / rejected_lengths))
    raise AssertionError(loss_type)


def run(loss_type, inputs, **options):
    chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths = inputs
    return dpo_loss(jnp.float32(chosen), jnp.float32(rejected), jnp.float32(ref_chosen), jnp.float32(ref_rejected),
                    beta=BETA, loss_type=loss_type, chosen_lengths=jnp.float32(chosen_lengths),
                    rejected_lengths=jnp.float32(rejected_lengths), **options)


SMOOTHING = {"exo_pair": [1e-3, 0.2], "robust": [0.0, 0.1, 0.3], "aot": [0.0, 0.25], "aot_unpaired": [0.1]}
CASES = [(name, eps) for name in DPO_LOSS_TYPES for eps in SMOOTHING.get(name, [0.0])]


@pytest.mark.parametrize("loss_type,label_smoothing", CASES)
def test_every_loss_type_matches_its_formula(loss_type, label_smoothing):
    inputs = pairs()
    expected = reference_per_pair(loss_type, *inputs, eps=label_smoothing).mean()
    loss, _ = run(loss_type, inputs, label_smoothing=label_smoothing)
    assert float(loss) == pytest.approx(expected, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid_norm", "discopop"])
def test_f_divergences(divergence, loss_type):
    inputs = pairs(seed=1)
    expected = reference_per_pair(loss_type, *inputs, divergence=divergence, alpha=0.3).mean()
    loss, _ = run(loss_type, inputs, f_divergence_type=divergence, f_alpha_divergence_coef=0.3)
    assert float(loss) == pytest.approx(expected, rel=2e-5, abs=1e-6)


def test_alpha_divergence_at_one_is_reverse_kl():
    inputs = pairs(seed=2)
    loss, _ = run("sigmoid", inputs, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert float(loss) == pytest.approx(reference_per_pair("sigmoid", *inputs).mean(), rel=1e-5)


def test_list_of_loss_types_is_the_weighted_sum():
    """MPO (Wang et al. 2024): 0.8 sigmoid + 0.2 bco_pair + 1.0 sft."""
    inputs = pairs(seed=3)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    expected = sum(w * reference_per_pair(n, *inputs).mean() for n, w in zip(names, weights, strict=True))
    loss, _ = run(names, inputs, loss_weights=weights)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    unweighted, _ = run(["sigmoid", "hinge"], inputs)
    expected = reference_per_pair("sigmoid", *inputs).mean() + reference_per_pair("hinge", *inputs).mean()
    assert float(unweighted) == pytest.approx(expected, rel=1e-5)


def test_metrics_have_trl_names_and_values():
    chosen, rejected, ref_chosen, ref_rejected, *_ = inputs = pairs(seed=4)
    _, metrics = run("sigmoid", inputs)
    c, r = BETA * (chosen - ref_chosen), BETA * (rejected - ref_rejected)
    expected = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).mean(),
                "rewards/margins": (c - r).mean(), "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_sigmoid_gradient_is_analytic():
    """d/d chosen_logps of mean(-log sigmoid(beta d)) = -beta sigmoid(-beta d) / B; the reference gets none."""
    chosen, rejected, ref_chosen, ref_rejected, *_ = pairs(seed=5)
    d = (chosen - ref_chosen) - (rejected - ref_rejected)

    def loss(c, r, rc, rr):
        return dpo_loss(c, r, rc, rr, beta=BETA)[0]

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*(jnp.float32(x) for x in (chosen, rejected, ref_chosen,
                                                                             ref_rejected)))
    expected = -BETA * sigmoid(-BETA * d) / len(d)
    np.testing.assert_allclose(grads[0], expected, rtol=1e-5)
    np.testing.assert_allclose(grads[1], -expected, rtol=1e-5)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", "aot"])
def test_pair_mask_and_num_pairs_split_a_batch_exactly(loss_type):
    """Masked pairs count nowhere; micro-batch losses normalised by the big batch's counts add up to it."""
    inputs = [np.float32(x) for x in pairs(batch=8, seed=6)]
    options = dict(beta=BETA, loss_type=loss_type, chosen_lengths=inputs[4], rejected_lengths=inputs[5])
    full, full_metrics = dpo_loss(*inputs[:4], **options)
    mask = np.arange(8) < 5
    padded = [np.where(mask, x, 0.0) for x in inputs]
    masked, masked_metrics = dpo_loss(*padded[:4], **{**options, "chosen_lengths": padded[4],
                                                      "rejected_lengths": padded[5]}, pair_mask=mask)
    alone, alone_metrics = dpo_loss(*(x[:5] for x in inputs[:4]), **{**options, "chosen_lengths": inputs[4][:5],
                                                                     "rejected_lengths": inputs[5][:5]})
    assert float(masked) == pytest.approx(float(alone), rel=1e-6)
    for key in alone_metrics:
        assert float(masked_metrics[key]) == pytest.approx(float(alone_metrics[key]), rel=1e-6, abs=1e-7), key
    if loss_type == "aot":
        return  # sorts within the pairs given: no exact split
    halves = [slice(0, 3), slice(3, 8)]
    parts = [dpo_loss(*(x[h] for x in inputs[:4]), **{**options, "chosen_lengths": inputs[4][h],
                                                      "rejected_lengths": inputs[5][h]},
                      num_pairs=8.0, sft_num_tokens=float(inputs[4].sum()))[0] for h in halves]
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-5)


def test_wpo_weights_and_weighted_loss():
    """WPO (Zhou et al. 2024, Eq. 2): w = exp(mean_t (log p_t - log sum_v p_v^2)); the pair loss is scaled by
    w_chosen * w_rejected, and no gradient flows through the weights."""
    rng = np.random.RandomState(7)
    token_logps = -rng.uniform(0.1, 3.0, (2, 4, 9))  # [chosen/rejected, batch, seq]
    log_sum_sq = -rng.uniform(0.5, 4.0, (2, 4, 9))
    masks = (rng.rand(2, 4, 9) > 0.3).astype(np.float64)
    masks[:, :, 0] = 1
    expected_weights = np.exp(((token_logps - log_sum_sq) * masks).sum(-1) / masks.sum(-1))
    weights = [wpo_weights(jnp.float32(token_logps[i]), jnp.float32(log_sum_sq[i]), jnp.float32(masks[i]))
               for i in range(2)]
    np.testing.assert_allclose(np.stack(weights), expected_weights, rtol=1e-5)

    chosen, rejected = (token_logps * masks).sum(-1)
    ref_chosen, ref_rejected = chosen + 0.5, rejected - 0.25
    per_pair = reference_per_pair("sigmoid", chosen, rejected, ref_chosen, ref_rejected, None, None)
    expected = (per_pair * expected_weights[0] * expected_weights[1]).mean()

    def loss(c, r):
        return dpo_loss(c, r, jnp.float32(ref_chosen), jnp.float32(ref_rejected), beta=BETA,
                        chosen_weights=weights[0], rejected_weights=weights[1])[0]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.float32(chosen), jnp.float32(rejected))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    d = (chosen - ref_chosen) - (rejected - ref_rejected)
    expected_grad = -BETA * sigmoid(-BETA * d) * expected_weights[0] * expected_weights[1] / 4
    np.testing.assert_allclose(grads[0], expected_grad, rtol=1e-4)


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.4, 1.0])
def test_ld_dpo_sequence_logps(ld_alpha):
    """LD-DPO (Liu et al. 2024): tokens past the shorter completion of the pair are weighted by alpha."""
    rng = np.random.RandomState(8)
    token_logps = -rng.uniform(0.1, 3.0, (2, 3, 12))
    lengths = np.array([[3, 7, 5], [6, 2, 5]])  # [chosen/rejected, batch]
    starts = np.array([[2, 1, 4], [2, 1, 4]])  # completions start after a prompt
    masks = np.zeros((2, 3, 12))
    expected = np.zeros((2, 3))
    for side in range(2):
        for b in range(3):
            shared = min(lengths[0, b], lengths[1, b])
            for k in range(lengths[side, b]):
                t = starts[side, b] + k
                masks[side, b, t] = 1
                weight = 1.0 if ld_alpha is None or k < shared else ld_alpha
                expected[side, b] += weight * token_logps[side, b, t]
    chosen, rejected = ld_sequence_logps(*(jnp.float32(x) for x in (token_logps[0], token_logps[1], masks[0],
                                                                     masks[1])), ld_alpha=ld_alpha)
    np.testing.assert_allclose(np.stack([chosen, rejected]), expected, rtol=1e-5)


def test_completion_token_metrics():
    rng = np.random.RandomState(9)
    stats = [{"entropy": rng.rand(2, 5), "mean_logits": rng.randn(2, 5), "is_top1": (rng.rand(2, 5) > 0.5) * 1.0}
             for _ in range(2)]
    masks = [(rng.rand(2, 5) > 0.4) * 1.0 for _ in range(2)]
    metrics = completion_token_metrics(*({k: jnp.float32(v) for k, v in s.items()} for s in stats),
                                       jnp.float32(masks[0]), jnp.float32(masks[1]))
    all_entropy = np.concatenate([stats[0]["entropy"][masks[0] > 0], stats[1]["entropy"][masks[1] > 0]])
    expected = {"entropy": all_entropy.mean(), "logits/chosen": stats[0]["mean_logits"][masks[0] > 0].mean(),
                "logits/rejected": stats[1]["mean_logits"][masks[1] > 0].mean(),
                "mean_token_accuracy": stats[0]["is_top1"][masks[0] > 0].mean()}
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("options,message", [
    ({"loss_type": "bogus"}, "loss_type='bogus' is not a DPO loss"),
    ({"loss_type": ["sigmoid", "nope"]}, "loss_type='nope' is not a DPO loss"),
    ({"loss_type": "exo_pair"}, "'exo_pair' needs 0 < label_smoothing < 1"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "'robust' needs 0 <= label_smoothing < 0.5"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights=\\[1.0\\] has 1 weights for 2"),
    ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "only defined for the loss types"),
    ({"f_divergence_type": "chi2"}, "f_divergence_type='chi2'"),
    ({"loss_type": "aot", "chosen_weights": np.ones(2), "rejected_weights": np.ones(2)}, "cannot be combined"),
    ({"loss_type": "ipo"}, "pass chosen_lengths and rejected_lengths"),
])
def test_bad_options_raise_clear_errors(options, message):
    logps = jnp.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(logps, logps, logps, logps, **options)
