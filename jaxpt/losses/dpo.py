"""Direct Preference Optimization and its variants, as pure functions of per-sequence log-probabilities.

Inputs are per-sequence sums of completion-token log-probabilities `[batch]` under the policy and the
reference (`chosen_logps`, `rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps`). With the log-ratios

    c = chosen_logps - ref_chosen_logps,   r = rejected_logps - ref_rejected_logps

and the f-divergence scores `s(c), s(r)` (below; `s(x) = x` for the reverse KL of standard DPO), `d = s(c) - s(r)`,
`beta` = β and `label_smoothing` = ε, each loss type's per-pair loss is (TRL 1.16's definitions):

| loss type      | per-pair loss                                                        | paper                      |
|----------------|----------------------------------------------------------------------|----------------------------|
| `sigmoid`      | -log σ(βd)                                                           | DPO, arXiv:2305.18290      |
| `hinge`        | max(0, 1 - βd)                                                       | SLiC, arXiv:2305.10425     |
| `ipo`          | (s(c)/n_c - s(r)/n_r - 1/(2β))²   (per-token averages: n = lengths)  | IPO, arXiv:2310.12036      |
| `exo_pair`     | q log(q/(1-ε)) + (1-q) log((1-q)/ε),  q = σ(βd)                      | EXO, arXiv:2402.00856      |
| `nca_pair`     | -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)                             | NCA, arXiv:2402.05369      |
| `robust`       | (-(1-ε) log σ(βd) + ε log σ(-βd)) / (1 - 2ε)                         | rDPO, arXiv:2403.00409     |
| `bco_pair`     | -log σ(βc) - log σ(-βr)                                              | BCO, arXiv:2404.04656      |
| `sppo_hard`    | (c - 1/(2β))² + (r + 1/(2β))²                                        | SPPO, arXiv:2405.00675     |
| `aot`          | -(1-ε) log σ(βΔ) - ε log σ(-βΔ),  Δ: see below                       | AOT, arXiv:2406.05882      |
| `aot_unpaired` | the same with Δ = sort(c) - sort(r)                                  | AOT, arXiv:2406.05882      |
| `apo_zero`     | 1 - σ(βc) + σ(βr)                                                    | APO, arXiv:2408.06266 (7)  |
| `apo_down`     | σ(βc) + 1 - σ(β(c - r))                                              | APO, arXiv:2408.06266 (8)  |
| `discopop`     | (1-m)·(-log σ(βd)) + m·exp(-βd),  m = σ(βd/τ)                        | DiscoPOP, arXiv:2406.08414 |
| `sft`          | -(Σ chosen completion-token log-probs) / (number of those tokens)    | (NLL of the chosen)        |
| `sigmoid_norm` | -log σ(β(s(c)/n_c - s(r)/n_r))                                       | (length-normalised DPO)    |

For `aot`, Δ = sort(chosen_logps - rejected_logps) - sort(ref_chosen_logps - ref_rejected_logps), each sorted
over the batch (the pairs are matched by rank, not by index).

The loss is `Σ_k w_k mean_pairs(loss_k)` over the loss types in `loss_type` (one name or a list) with
`loss_weights` `w_k` (default 1 each), e.g. MPO = `["sigmoid", "bco_pair", "sft"]`, `[0.8, 0.2, 1.0]`.

f-divergences (f-DPO, arXiv:2309.16240), `s(x)` for a log-ratio `x = log t`: `reverse_kl` x; `forward_kl`
1 - e^(-x); `js_divergence` log 2 + log σ(x); `alpha_divergence` (e^((α-1)x) - 1)/(α-1) with α =
`f_alpha_divergence_coef` (the exponent clipped at 80; α = 1 falls back to the reverse KL). Only the loss types
built on the chosen-rejected score difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft)
accept a non-default f-divergence, as in TRL.

Two variants need per-token information; they enter as explicit inputs computed by the helpers here:
- WPO (arXiv:2406.11827, `use_weighting`): each pair's loss is multiplied by `chosen_weights * rejected_weights`,
  the policy's length-normalised sequence probabilities from `wpo_weights(token_logps, log_sum_sq_probs, mask)`
  (constants: no gradient).
- LD-DPO (arXiv:2409.06411, `ld_alpha`): the per-sequence log-probs themselves change: tokens beyond the shorter
  completion of the pair count with weight α. `ld_sequence_logps` turns per-token log-probs into those sums, for
  the policy and the reference alike, before `dpo_loss`.

Metrics (TRL's names, means over the pairs): `rewards/chosen` (β c), `rewards/rejected` (β r),
`rewards/accuracies` (β c > β r), `rewards/margins` (β (c - r)), `logps/chosen`, `logps/rejected`.
`completion_token_metrics` adds TRL's per-token ones: `entropy`, `logits/chosen`, `logits/rejected` (the mean logit
over the vocabulary, averaged over the completion tokens) and `mean_token_accuracy` (of the chosen completions).
With `return_counts=True` both return each metric as a `(sum, count)` pair (`jaxpt.losses.metrics`) over its pairs
or tokens, which add up over micro-batches and batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxpt.losses.logprobs import masked_mean
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a β log Z(x) term that cancels only in the chosen - rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "sigmoid_norm")
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")


def check_dpo_options(
    loss_type: str | Sequence[str],
    *,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """`(loss_types, loss_weights)` as tuples, or a `ValueError` naming the option and the fix. `DPOConfig` and
    `dpo_loss` both call it, so a bad combination fails when the config is built, before anything compiles."""
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not loss_types:
        raise ValueError(f"loss_type={list(loss_types)} is empty; use one or more of {DPO_LOSS_TYPES}.")
    unknown = [name for name in loss_types if name not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type={unknown[0]!r} is not a DPO loss; use one of {DPO_LOSS_TYPES}.")
    if loss_weights is None:
        weights = (1.0,) * len(loss_types)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(loss_types):
            raise ValueError(f"loss_weights={list(weights)} has {len(weights)} weights for {len(loss_types)} loss "
                             f"types {list(loss_types)}: give one weight per loss type (or none for all 1.0).")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r}; use one of {F_DIVERGENCE_TYPES}.")
    if f_divergence_type != "reverse_kl":
        unsupported = [name for name in loss_types if name not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is only defined for the loss types "
                             f"{F_DIVERGENCE_LOSS_TYPES}, not {unsupported}: use f_divergence_type='reverse_kl' "
                             "with those.")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (the ε of EXO's target "
                         f"distribution; the paper recommends 1e-3), got label_smoothing={label_smoothing}.")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5 (the probability that a preference "
                         f"label is flipped; the paper suggests 0.1), got label_smoothing={label_smoothing}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
    if use_weighting and any(name in SORTING_LOSS_TYPES for name in loss_types):
        raise ValueError("use_weighting=True (WPO) cannot be combined with 'aot' / 'aot_unpaired': those losses sort "
                         "the pairs, which would misalign the per-pair weights.")
    return loss_types, weights


def f_divergence_scores(logratios: jax.Array, f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    """`f'(t)` at `t = exp(logratios)` (f-DPO): the score that replaces the log-ratio in the loss."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(α-1) - 1) / (α - 1)
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the limit is log t: the reverse KL
            return logratios
        exponent = jnp.minimum((alpha - 1.0) * logratios, 80.0)  # keep exp() finite in float32
        return (jnp.exp(exponent) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type={f_divergence_type!r}; use one of {F_DIVERGENCE_TYPES}.")


def _sort_valid(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Ascending sort with the masked-out entries moved to the end (they then pair with each other)."""
    return jnp.sort(jnp.where(mask, values, jnp.finfo(jnp.float32).max))


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    chosen_weights: jax.Array | None = None,
    rejected_weights: jax.Array | None = None,
    sft_chosen_logps: jax.Array | None = None,
    sft_num_tokens: jax.Array | float | None = None,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """DPO-family loss of a batch of preference pairs (formulas in the module docstring).

    Arguments, all `[batch]` unless noted:
    - `chosen_logps`, `rejected_logps`: policy log-probs of each completion, summed over its tokens (for LD-DPO,
      the `ld_sequence_logps` sums); differentiable.
    - `ref_chosen_logps`, `ref_rejected_logps`: the same under the reference model (treated as constants).
    - `chosen_lengths`, `rejected_lengths`: completion lengths in tokens, needed by `ipo` and `sigmoid_norm`
      (TRL: the completion-mask sums, clipped at 1).
    - `chosen_weights`, `rejected_weights`: WPO weights from `wpo_weights` (each pair's loss is multiplied by
      their product); None for no weighting.
    - `sft_chosen_logps`, `sft_num_tokens`: for loss type `sft`, the plain sums of the chosen completions'
      token log-probs (default `chosen_logps`, which differ under LD-DPO) and the token count the NLL is
      averaged over (default `sum(chosen_lengths)`).
    - `pair_mask`: pairs that count (default all), e.g. to ignore padding pairs.
    - `num_pairs`, `sft_num_tokens`: normalisers for gradient accumulation: pass the pair count and the chosen
      token count of the whole accumulated batch, and the micro-batch losses sum to the big-batch loss (as
      `sft_loss`'s `num_tokens`). `aot`/`aot_unpaired` sort within the pairs given; with WPO, the `sft` term is
      scaled by the mean pair weight of the pairs given.

    Returns `(loss, metrics)`; metrics are means over the (unmasked) pairs given, with TRL's names (with
    `return_counts`, `(sum, count)` pairs).
    """
    loss_types, weights = check_dpo_options(loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                                            f_divergence_type=f_divergence_type,
                                            use_weighting=chosen_weights is not None)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    chosen_logps, rejected_logps = f32(chosen_logps), f32(rejected_logps)
    ref_chosen_logps = jax.lax.stop_gradient(f32(ref_chosen_logps))
    ref_rejected_logps = jax.lax.stop_gradient(f32(ref_rejected_logps))
    mask = jnp.ones(chosen_logps.shape, bool) if pair_mask is None else jnp.asarray(pair_mask).astype(bool)
    local_pairs = jnp.sum(mask)
    denominator = jnp.maximum(local_pairs if num_pairs is None else f32(num_pairs), 1.0)

    needs_lengths = [name for name in loss_types if name in LENGTH_NORMALISED_LOSS_TYPES]
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {needs_lengths[0]!r} averages over completion tokens: pass chosen_lengths and "
                         "rejected_lengths (completion lengths in tokens).")
    if "sft" in loss_types and sft_num_tokens is None and chosen_lengths is None:
        raise ValueError("loss_type 'sft' averages the chosen NLL over tokens: pass sft_num_tokens (or "
                         "chosen_lengths).")

    chosen_logratios = chosen_logps - ref_chosen_logps  # c
    rejected_logratios = rejected_logps - ref_rejected_logps  # r
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores  # d
    log_sigmoid = jax.nn.log_sigmoid
    epsilon = label_smoothing
    if needs_lengths:
        chosen_avg = chosen_scores / jnp.maximum(f32(chosen_lengths), 1.0)
        rejected_avg = rejected_scores / jnp.maximum(f32(rejected_lengths), 1.0)
    pair_weights = None
    if chosen_weights is not None:
        pair_weights = jax.lax.stop_gradient(f32(chosen_weights) * f32(rejected_weights))

    loss = jnp.zeros((), jnp.float32)
    for name, weight in zip(loss_types, weights, strict=True):
        if name == "sft":
            sft_logps = chosen_logps if sft_chosen_logps is None else f32(sft_chosen_logps)
            tokens = jnp.sum(jnp.where(mask, f32(chosen_lengths), 0.0)) if sft_num_tokens is None else sft_num_tokens
            term = -jnp.sum(jnp.where(mask, sft_logps, 0.0)) / jnp.maximum(f32(tokens), 1.0)
            if pair_weights is not None:  # TRL broadcasts the batch NLL to every pair, then weights the pairs
                term = term * masked_mean(pair_weights, mask)
            loss = loss + weight * term
            continue
        if name == "sigmoid":
            per_pair = -log_sigmoid(beta * delta)
        elif name == "hinge":
            per_pair = jax.nn.relu(1.0 - beta * delta)
        elif name == "ipo":  # β is IPO's τ; per-token averages keep the square independent of the length
            per_pair = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
        elif name == "exo_pair":  # KL(softmax(βd) || [1-ε, ε]) over {chosen, rejected}
            q_chosen, q_rejected = jax.nn.sigmoid(beta * delta), jax.nn.sigmoid(-beta * delta)
            per_pair = (q_chosen * (log_sigmoid(beta * delta) - math.log1p(-epsilon))
                        + q_rejected * (log_sigmoid(-beta * delta) - math.log(epsilon)))
        elif name == "nca_pair":
            per_pair = (-log_sigmoid(beta * chosen_logratios) - 0.5 * log_sigmoid(-beta * chosen_logratios)
                        - 0.5 * log_sigmoid(-beta * rejected_logratios))
        elif name == "robust":
            per_pair = ((-(1.0 - epsilon) * log_sigmoid(beta * delta) + epsilon * log_sigmoid(-beta * delta))
                        / (1.0 - 2.0 * epsilon))
        elif name == "bco_pair":
            per_pair = -log_sigmoid(beta * chosen_logratios) - log_sigmoid(-beta * rejected_logratios)
        elif name == "sppo_hard":  # the hard-label (P = 1 for the winner) form of SPPO's squared loss
            per_pair = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif name in SORTING_LOSS_TYPES:
            if name == "aot":
                sorted_delta = (_sort_valid(chosen_logps - rejected_logps, mask)
                                - _sort_valid(ref_chosen_logps - ref_rejected_logps, mask))
            else:
                sorted_delta = _sort_valid(chosen_logratios, mask) - _sort_valid(rejected_logratios, mask)
            per_pair = (-(1.0 - epsilon) * log_sigmoid(beta * sorted_delta)
                        - epsilon * log_sigmoid(-beta * sorted_delta))
            # sorted: the valid values occupy the first `local_pairs` slots
            per_pair = jnp.where(jnp.arange(per_pair.shape[0]) < local_pairs, per_pair, 0.0)
            loss = loss + weight * jnp.sum(per_pair) / denominator
            continue
        elif name == "apo_zero":  # raise the chosen likelihood, lower the rejected one
            per_pair = 1.0 - jax.nn.sigmoid(beta * chosen_logratios) + jax.nn.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":  # lower both, the rejected one more
            per_pair = (jax.nn.sigmoid(beta * chosen_logratios)
                        + 1.0 - jax.nn.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif name == "discopop":  # log-ratio modulated blend of the logistic and exponential losses
            logits = beta * delta
            modulation = jax.nn.sigmoid(logits / discopop_tau)
            per_pair = -log_sigmoid(logits) * (1.0 - modulation) + jnp.exp(-logits) * modulation
        else:  # sigmoid_norm
            per_pair = -log_sigmoid(beta * (chosen_avg - rejected_avg))
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + weight * jnp.sum(jnp.where(mask, per_pair, 0.0)) / denominator

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    metrics = {
        "rewards/chosen": sum_and_count(chosen_rewards, mask),
        "rewards/rejected": sum_and_count(rejected_rewards, mask),
        "rewards/accuracies": sum_and_count((chosen_rewards > rejected_rewards).astype(jnp.float32), mask),
        "rewards/margins": sum_and_count(chosen_rewards - rejected_rewards, mask),
        "logps/chosen": sum_and_count(jax.lax.stop_gradient(chosen_logps), mask),
        "logps/rejected": sum_and_count(jax.lax.stop_gradient(rejected_logps), mask),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Per-token helpers: LD-DPO sums, WPO weights, TRL's per-token metrics
# --------------------------------------------------------------------------------------------------------------


def ld_sequence_logps(chosen_token_logps: jax.Array, rejected_token_logps: jax.Array, chosen_mask: jax.Array,
                      rejected_mask: jax.Array, *, ld_alpha: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-sequence log-probs `([batch], [batch])` from per-token ones `[batch, seq]` and completion masks.

    Plain sums without `ld_alpha`. With it (LD-DPO, arXiv:2409.06411), the first `min(n_chosen, n_rejected)`
    completion tokens of each sequence count fully and the rest (the verbose tail of the longer completion) with
    weight `ld_alpha`: `logps = Σ_shared log p + α Σ_tail log p`. Apply it to the policy and the reference alike.
    """
    chosen_mask = chosen_mask.astype(jnp.float32)
    rejected_mask = rejected_mask.astype(jnp.float32)
    if ld_alpha is None:
        return jnp.sum(chosen_token_logps * chosen_mask, -1), jnp.sum(rejected_token_logps * rejected_mask, -1)
    shared = jnp.minimum(jnp.sum(chosen_mask, -1), jnp.sum(rejected_mask, -1))[:, None]

    def weighted(token_logps, mask):
        position = jnp.cumsum(mask, axis=-1)  # 1, 2, ... along the completion
        token_weight = jnp.where(position <= shared, 1.0, ld_alpha) * mask
        return jnp.sum(token_logps * token_weight, -1)

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps: jax.Array, log_sum_sq_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """WPO's per-sequence weight `[batch]` (arXiv:2406.11827, Eq. 2, as TRL computes it): the policy's
    length-normalised probability of the completion under the "aligned" distribution p_t(y)/‖p_t‖²,

        w = exp( Σ_t m_t (log p(y_t) - log Σ_v p(v)²) / max(Σ_t m_t, 1) ),

    from per-token log-probs, `log_sum_sq_probs` (`chunked_token_logps_and_stats`) and the completion mask, all
    `[batch, seq]`. A constant (no gradient)."""
    mask = mask.astype(jnp.float32)
    aligned = jnp.sum((token_logps - log_sum_sq_probs) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return jax.lax.stop_gradient(jnp.exp(aligned))


def completion_token_metrics(chosen_stats: dict[str, jax.Array], rejected_stats: dict[str, jax.Array],
                             chosen_mask: jax.Array, rejected_mask: jax.Array, *,
                             return_counts: bool = False) -> dict[str, jax.Array] | MetricPairs:
    """TRL's per-token DPO metrics from `chunked_token_logps_and_stats` statistics (`entropy`, `mean_logits`,
    `is_top1`, each `[batch, seq]`) of the chosen and rejected sequences and their completion masks:
    `entropy` (over all completion tokens), `logits/chosen` and `logits/rejected` (the mean logit over the
    vocabulary, averaged over the completion tokens), `mean_token_accuracy` (top-1 hits on the chosen
    completions)."""
    chosen_entropy, chosen_tokens = sum_and_count(chosen_stats["entropy"], chosen_mask)
    rejected_entropy, rejected_tokens = sum_and_count(rejected_stats["entropy"], rejected_mask)
    metrics = {
        "entropy": (chosen_entropy + rejected_entropy, chosen_tokens + rejected_tokens),
        "logits/chosen": sum_and_count(chosen_stats["mean_logits"], chosen_mask),
        "logits/rejected": sum_and_count(rejected_stats["mean_logits"], rejected_mask),
        "mean_token_accuracy": sum_and_count(chosen_stats["is_top1"], chosen_mask),
    }
    return metrics if return_counts else mean_metrics(metrics)
