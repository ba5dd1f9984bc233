"""GOLD: the ULD loss against TRL 1.16's own `ULDLoss` (trl.experimental.gold) driven with fixed logits, labels,
token ids and byte offsets — every merge strategy, extended and positional alignment, the hybrid loss, with and
without the EOS skips — values and gradients; the byte alignment of two real tiny tokenizers; and `jaxpt gold`
bringing a student closer to a teacher with another tokenizer."""

import json
from types import SimpleNamespace

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from trl.experimental.gold.gold_trainer import GOLDTrainer, ULDLoss  # parity must fail, never skip, without trl

import jaxpt.models
from jaxpt import cli, distillation
from jaxpt.experimental import gold
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama

BIGRAMS = ["ab", "cd", "ef", "gh", "12", "34", "+1", "=1"]


def bigram_tokenizer():
    """A teacher tokenizer unlike the student's: some character pairs are one token, and the ids differ (specials
    last, characters in reverse order)."""
    import string

    pieces = BIGRAMS + sorted(set(string.printable), reverse=True)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for special in ("<pad>", "<s>", "</s>", "<unk>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(p.replace("+", "\\+") for p in BIGRAMS) + "|."
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


TEACHER_TOKENIZER = bigram_tokenizer()
TEACHER_VOCAB = len(TEACHER_TOKENIZER)


# --------------------------------------------------------------------------------------------------------------
# The loss against TRL's ULDLoss
# --------------------------------------------------------------------------------------------------------------


def random_side(rng, texts_bytes, *, seq, vocab, max_piece, prompt_lengths, left_pad):
    """TRL-style inputs of one side: labels (-100 off the answer), ids, byte offsets (completion-relative, EOS a
    zero-width span at the end) for answers that split each text into pieces of 1..max_piece bytes."""
    batch = len(texts_bytes)
    labels = np.full((batch, seq), -100)
    ids = rng.integers(4, vocab, size=(batch, seq))
    offsets = np.zeros((batch, seq, 2), np.int64)
    for row, (length, prompt) in enumerate(zip(texts_bytes, prompt_lengths, strict=True)):
        cuts, position = [], 0
        while position < length:
            step = int(rng.integers(1, max_piece + 1))
            cuts.append((position, min(length, position + step)))
            position += step
        spans = cuts + [(length, length)]  # the EOS
        start = seq - len(spans) if left_pad else prompt
        assert start >= 1 and start + len(spans) <= seq
        labels[row, start:start + len(spans)] = ids[row, start:start + len(spans)]
        offsets[row, start:start + len(spans)] = spans
    return labels, ids, offsets


def jaxpt_uld(student_logits, teacher_logits, sides, config, hybrid):
    """jaxpt's loss on TRL-style inputs: each example's answer span from its labels (less the EOS when skipped),
    the logit rows at the answer (observed) or one earlier (bayesian), the groups and arrays from `gold`'s helpers."""
    shift = 1 if config["uld_token_merge_strategy"] == "bayesian" else 0
    per_side = {}
    groups = []
    for name, (labels, ids, offsets), skip in (("student", sides[0], config["uld_skip_student_eos"]),
                                               ("teacher", sides[1], config["uld_skip_teacher_eos"])):
        rows, tokens, spans = [], [], []
        for row in range(labels.shape[0]):
            positions = np.nonzero(labels[row] != -100)[0]
            start, size = positions[0], len(positions) - (1 if skip else 0)
            rows.append(np.arange(start, start + size) - shift)
            tokens.append(ids[row, start:start + size])
            spans.append([tuple(o) for o in offsets[row, start:start + size]])
        per_side[name] = (rows, tokens, spans)
    for row in range(len(per_side["student"][0])):
        groups.append(gold.answer_groups(per_side["student"][2][row], per_side["teacher"][2][row],
                                         use_extended_uld=config["use_extended_uld"]))
    width = {name: max(len(r) for r in rows) for name, (rows, _, _) in per_side.items()}
    alignment = gold.alignment_arrays([g[0] for g in groups], [g[1] for g in groups],
                                      merge_strategy=config["uld_token_merge_strategy"],
                                      student_length=width["student"], teacher_length=width["teacher"],
                                      num_groups=width["student"])
    padded = {name: (np.stack([np.pad(r, (0, width[name] - len(r))) for r in rows]),
                     np.stack([np.pad(t, (0, width[name] - len(t))) for t in tokens]))
              for name, (rows, tokens, _) in per_side.items()}

    def loss_fn(student):
        gather = lambda logits, index: jnp.take_along_axis(logits, index[..., None], axis=1)  # noqa: E731
        return gold.uld_loss(gather(student, jnp.asarray(padded["student"][0])),
                             gather(jnp.asarray(teacher_logits), jnp.asarray(padded["teacher"][0])),
                             jnp.asarray(padded["student"][1]), jnp.asarray(padded["teacher"][1]),
                             {k: jnp.asarray(v) for k, v in alignment.items()}, hybrid=hybrid, beta=config["beta"],
                             student_temperature=config["uld_student_temperature"],
                             teacher_temperature=config["uld_teacher_temperature"],
                             distillation_weight=config["uld_distillation_weight"],
                             hybrid_matched_weight=config["uld_hybrid_matched_weight"],
                             hybrid_unmatched_weight=config["uld_hybrid_unmatched_weight"])[0]

    return jax.value_and_grad(loss_fn)(jnp.asarray(student_logits))


CASES = [dict(uld_token_merge_strategy="observed", use_extended_uld=True),
         dict(uld_token_merge_strategy="bayesian", use_extended_uld=True),
         dict(uld_token_merge_strategy="observed", use_extended_uld=False),
         dict(uld_token_merge_strategy="bayesian", use_extended_uld=False, uld_skip_student_eos=False),
         dict(uld_token_merge_strategy="observed", use_extended_uld=True, uld_use_hybrid_loss=True),
         dict(uld_token_merge_strategy="bayesian", use_extended_uld=True, uld_use_hybrid_loss=True, beta=0.0,
              uld_skip_teacher_eos=False),
         dict(uld_token_merge_strategy="bayesian", use_extended_uld=True, uld_use_hybrid_loss=True, beta=1.0,
              uld_hybrid_matched_weight=0.3, uld_hybrid_unmatched_weight=2.0, uld_student_temperature=0.7,
              uld_teacher_temperature=1.5, uld_distillation_weight=0.5)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_uld_loss_matches_trl(case):
    """TRL's `ULDLoss` (built from a config namespace; the hybrid's vocabularies from `get_vocab()` of two fake
    tokenizers sharing some strings) and jaxpt's on the same inputs: three examples with answers of different
    lengths, a student (vocab 13) and a teacher (vocab 17) whose tokens split the same bytes differently."""
    config = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                  uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
                  uld_use_hybrid_loss=False, uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None,
                  beta=0.5)
    config.update(case)
    rng = np.random.default_rng(0)
    texts = [7, 4, 9]
    student_side = random_side(rng, texts, seq=14, vocab=13, max_piece=2, prompt_lengths=[0, 0, 0],
                               left_pad=True)
    teacher_side = random_side(rng, texts, seq=16, vocab=17, max_piece=3, prompt_lengths=[3, 5, 2], left_pad=False)
    student_logits = (rng.normal(size=(3, 14, 13)) * 2).astype(np.float32)
    teacher_logits = (rng.normal(size=(3, 16, 17)) * 2).astype(np.float32)
    student_words = {f"w{i}": i for i in range(13)}
    teacher_words = {f"w{i}": i + 6 for i in range(11)} | {f"t{i}": i for i in range(6)}  # 11 shared, shifted

    tokenizers = (SimpleNamespace(get_vocab=lambda: student_words), SimpleNamespace(get_vocab=lambda: teacher_words))
    trl_loss_fn = ULDLoss(SimpleNamespace(**config), *tokenizers)
    student_torch = torch.tensor(student_logits, requires_grad=True)
    expected = trl_loss_fn(student_torch, torch.tensor(teacher_logits), torch.tensor(student_side[0]),
                           torch.tensor(teacher_side[0]), torch.tensor(student_side[1]), torch.tensor(teacher_side[1]),
                           student_byte_offsets=torch.tensor(student_side[2]),
                           teacher_byte_offsets=torch.tensor(teacher_side[2]))
    expected.backward()

    hybrid = None
    if config["uld_use_hybrid_loss"]:
        hybrid = gold.hybrid_vocabulary(*tokenizers, student_vocab_size=13, teacher_vocab_size=17)
        assert hybrid.teacher_matched.size == 11 and hybrid.student_unmatched.size == 2
    loss, grad = jaxpt_uld(student_logits, teacher_logits, (student_side, teacher_side), config, hybrid)
    assert expected.item() > 0.05
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), student_torch.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_byte_alignment_of_two_tokenizers():
    """The student's characters against the teacher's pairs: one group per place both tokenizations cut, a split
    token merged with what follows (observed) or precedes (bayesian) it."""
    text = "ab+1=12c"
    student_ids = TOKENIZER(text)["input_ids"]
    teacher_ids = TEACHER_TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert TEACHER_TOKENIZER.convert_ids_to_tokens(teacher_ids) == ["ab", "+1", "=1", "2", "c"]
    student_spans = gold.token_byte_spans(TOKENIZER, student_ids)
    teacher_spans = gold.token_byte_spans(TEACHER_TOKENIZER, teacher_ids)
    assert student_spans == [(k, k + 1) for k in range(8)]
    assert teacher_spans == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8)]
    student_groups, teacher_groups = gold.align_by_byte_offsets(student_spans, teacher_spans)
    assert student_groups == [[0, 1], [2, 3], [4, 5], [6], [7]]
    assert teacher_groups == [[0], [1], [2], [3], [4]]
    # an answer whose tokenizations disagree to the end: one last group with the rest of each
    assert gold.align_by_byte_offsets([(0, 1), (1, 3)], [(0, 2), (2, 4)]) == ([[0, 1]], [[0, 1]])
    arrays = gold.alignment_arrays([student_groups], [teacher_groups], merge_strategy="bayesian", student_length=8,
                                   teacher_length=5, num_groups=8)
    assert arrays["student_base_index"][0, :5].tolist() == [1, 3, 5, 6, 7]
    assert arrays["student_scalar_group"][0].tolist() == [0, -1, 1, -1, 2, -1, -1, -1]
    assert arrays["group_mask"][0].tolist() == [1] * 5 + [0] * 3
    eos = gold.token_byte_spans(TOKENIZER, TOKENIZER("ab</s>")["input_ids"])
    assert eos == [(0, 1), (1, 2), (2, 2)]  # a special token is an empty span


def test_config_names_defaults_and_errors(tmp_path):
    config = gold.GOLDConfig(output_dir=str(tmp_path))
    assert (config.temperature, config.top_p, config.lmbda, config.beta, config.max_completion_length,
            config.learning_rate, config.use_uld_loss, config.use_extended_uld, config.uld_token_merge_strategy,
            config.uld_skip_student_eos) == (0.9, 0.95, 0.5, 0.5, 128, 1e-7, False, True, "observed", True)
    with pytest.raises(ValueError, match="uld_token_merge_strategy='median'"):
        gold.GOLDConfig(output_dir=str(tmp_path), uld_token_merge_strategy="median")
    with pytest.raises(ValueError, match="set both"):
        gold.GOLDConfig(output_dir=str(tmp_path), uld_hybrid_matched_weight=0.5)
    with pytest.raises(ValueError, match="uld_teacher_temperature=0 must be > 0"):
        gold.GOLDConfig(output_dir=str(tmp_path), uld_teacher_temperature=0)
    with pytest.raises(ValueError, match="seq_kd=True with use_uld_loss=True"):
        gold.GOLDConfig(output_dir=str(tmp_path), use_uld_loss=True, seq_kd=True)
    with pytest.raises(ValueError, match="lmbda=2 must be in"):
        gold.GOLDConfig(output_dir=str(tmp_path), lmbda=2)


# --------------------------------------------------------------------------------------------------------------
# Training across tokenizers
# --------------------------------------------------------------------------------------------------------------

PAIRS = [("ab+", "cd12"), ("ef=", "gh34"), ("12+", "ab+1"), ("34=", "=1cd")] * 2


def fixed_uld_batch(config, count=8):
    """`uld_batch` of the first `count` PAIRS (their dataset completions, EOS included)."""
    examples = [{"prompt_ids": TOKENIZER(p)["input_ids"], "completion_ids": TOKENIZER(c + "</s>")["input_ids"]}
                for p, c in PAIRS[:count]]
    arrays = {"prompt_ids": np.stack([np.pad(e["prompt_ids"], (13, 0)) for e in examples]).astype(np.int32),
              "prompt_mask": np.pad(np.ones((count, 3), np.int32), ((0, 0), (13, 0))),
              "completion_ids": np.stack([np.pad(e["completion_ids"], (0, 11)) for e in examples]).astype(np.int32),
              "attention_mask": np.pad(np.ones((count, 5), np.int32), ((0, 0), (0, 11)))}
    arrays["completion_mask"] = arrays["attention_mask"]
    teacher_prompts = [gold.teacher_prompt_ids(e["prompt_ids"], TOKENIZER, TEACHER_TOKENIZER) for e in examples]
    return gold.uld_batch(arrays, teacher_prompts, TOKENIZER, TEACHER_TOKENIZER, config)


def test_uld_step_accumulated_and_sharded_equals_one_big_batch(tmp_path):
    """8 examples as 1 x 8 or 2 x 4 micro-batches, or 1 x 8 on an 8-device fsdp mesh (student, teacher and the full
    logits of both split over it; hybrid ULD + cross-entropy): the same loss, metrics and update."""
    config = gold.GOLDConfig(output_dir=str(tmp_path), use_uld_loss=True, uld_use_hybrid_loss=True,
                             uld_crossentropy_weight=0.5, lmbda=0.0, max_completion_length=8, max_grad_norm=0.0)
    batch = fixed_uld_batch(config, count=8)
    teacher = tiny_llama(TEACHER_VOCAB, seed=7, initializer_range=0.3)
    graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    hybrid = gold.hybrid_vocabulary(TOKENIZER, TEACHER_TOKENIZER, student_vocab_size=VOCAB,
                                    teacher_vocab_size=TEACHER_VOCAB)
    results = []
    for accumulation, mesh in ((1, None), (2, None), (1, make_mesh(data=1, fsdp=8, tensor=1))):
        state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0), mesh=mesh)
        teacher_sharding = distillation.teacher_shardings(teacher_params, teacher, mesh)
        placed_teacher = teacher_params if mesh is None else jax.device_put(teacher_params, teacher_sharding)
        step = gold.make_uld_train_step(config, teacher_graphdef=graphdef, hybrid=hybrid, mesh=mesh,
                                        state_sharding=state.shardings(mesh), teacher_sharding=teacher_sharding)
        shaped = {k: v.reshape(accumulation, 8 // accumulation, *v.shape[1:]) for k, v in batch.items()}
        state, metrics = step(state, shard_batch(shaped, mesh, batch_axis=1, global_batch=True), placed_teacher)
        if mesh is not None:  # the student really is split over the 8 devices
            assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
                       for leaf in jax.tree.leaves(state.params))
        results.append((jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}))
    (params, metrics), *others = results
    assert metrics["loss"] > 0.1 and metrics["matched_loss"] > 0 and metrics["unmatched_loss"] > 0
    for other_params, other_metrics in others:
        for name in ("loss", "matched_loss", "unmatched_loss", "grad_norm"):
            np.testing.assert_allclose(other_metrics[name], metrics[name], rtol=2e-5)
        for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.parametrize("use_uld_loss", [True, False])
def test_evaluation_logs_the_loss_on_the_eval_completions(tmp_path, use_uld_loss):
    """`train(..., eval_dataset=...)`: `eval_loss` after the step is the training loss of the final student on all
    the eval rows' own completions at once (3 rows in batches of 2: the fill-up row counts for nothing)."""
    teacher_tokenizer = TEACHER_TOKENIZER if use_uld_loss else TOKENIZER
    teacher_vocab = TEACHER_VOCAB if use_uld_loss else VOCAB
    teacher = tiny_llama(teacher_vocab, seed=7, initializer_range=0.3)
    config = gold.GOLDConfig(output_dir=str(tmp_path), use_uld_loss=use_uld_loss, uld_crossentropy_weight=0.5,
                             lmbda=0.0, max_completion_length=8, max_steps=1, per_device_train_batch_size=8,
                             per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1, learning_rate=0.05,
                             mesh_fsdp=1, disable_tqdm=True, save_steps=0, save_final_model=False, logging_steps=1)
    rows = lambda pairs: datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])  # noqa: E731
    result = gold.train(tiny_llama(VOCAB, seed=0), TOKENIZER, rows(PAIRS), config, teacher_model=teacher,
                        teacher_tokenizer=teacher_tokenizer, eval_dataset=rows(PAIRS[1:4]))
    evaluations = [r for r in result.metrics if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [1]

    sampling_config = gold.distillation_config(config)
    examples = distillation.prepare_dataset(rows(PAIRS[1:4]), TOKENIZER, sampling_config.replace(lmbda=0.0))
    arrays, _ = distillation.dataset_completions(examples, TOKENIZER, prompt_buckets=[16], completion_buckets=[16])
    graphdef, params = result.state.graphdef, result.state.full_params()
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    tokens = float(arrays["completion_mask"].sum())
    if use_uld_loss:
        teacher_prompts = [gold.teacher_prompt_ids(e["completion_prompt_ids"], TOKENIZER, TEACHER_TOKENIZER)
                           for e in examples]
        batch = gold.uld_batch(arrays, teacher_prompts, TOKENIZER, TEACHER_TOKENIZER, config)
        expected, _ = gold.uld_loss_fn(params, graphdef, teacher_params, teacher_graphdef,
                                       {k: jnp.asarray(v) for k, v in batch.items()}, config, None, 3.0, tokens)
    else:
        expected, _ = distillation.loss_fn(params, graphdef, teacher_params, teacher_graphdef,
                                           {k: jnp.asarray(v) for k, v in arrays.items()}, sampling_config, tokens)
    assert float(expected) > 0.05
    np.testing.assert_allclose(evaluations[0]["eval_loss"], float(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="eval_dataset is prompt-only"):
        gold.train(tiny_llama(VOCAB, seed=0), TOKENIZER, rows(PAIRS), config, teacher_model=teacher,
                   teacher_tokenizer=teacher_tokenizer, eval_dataset=datasets.Dataset.from_list([{"prompt": "ab"}]))


def test_gold_command_brings_a_student_closer_to_a_teacher_with_another_tokenizer(tmp_path):
    """`jaxpt gold --use_uld_loss true` on-policy (lmbda=1; hybrid, bayesian merges): each step the student samples,
    the teacher with the bigram tokenizer reads the same text in its own tokens, and the student's ULD loss on other
    samples of its initial policy falls; metrics carry TRL's names; the student is exported. (The dataset-completion
    batches are `fixed_uld_batch`'s, checked here and in the accumulation test.)"""
    teacher = tiny_llama(TEACHER_VOCAB, seed=7, initializer_range=0.3)
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for directory, model, tokenizer in ((student_dir, tiny_llama(VOCAB, seed=0), TOKENIZER),
                                        (teacher_dir, teacher, TEACHER_TOKENIZER)):
        tokenizer.save_pretrained(directory)
        jaxpt.models.save_pretrained(model, directory)
    rows = tmp_path / "train.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p}) for p, _ in PAIRS) + "\n")
    out = tmp_path / "out"
    options = ["--use_uld_loss", "true", "--uld_use_hybrid_loss", "true", "--uld_token_merge_strategy", "bayesian",
               "--lmbda", "1.0", "--max_completion_length", "8"]
    code = cli.main(["gold", "--model_name_or_path", str(student_dir), "--teacher_model_name_or_path",
                     str(teacher_dir), "--dataset_name", str(rows), "--output_dir", str(out), "--max_steps", "12",
                     "--logging_steps", "6", "--per_device_train_batch_size", "8", "--learning_rate", "0.01",
                     "--mesh_fsdp", "1", "--disable_tqdm", "true", "--save_steps", "0", "--seed", "0", *options])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12]
    assert {"loss", "on_policy_loss", "matched_loss", "unmatched_loss", "grad_norm",
            "completions/mean_length"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]

    config = gold.GOLDConfig(output_dir=str(tmp_path / "eval"), use_uld_loss=True, uld_use_hybrid_loss=True,
                             uld_token_merge_strategy="bayesian", lmbda=1.0, max_completion_length=8)
    assert fixed_uld_batch(config)["group_mask"].sum(1).tolist() == [2] * 8  # "cd12": c,d | 1,2 vs cd | 12
    # the ULD loss on completions the initial student samples (another draw than training's)
    prompts = [TOKENIZER(p)["input_ids"] for p, _ in PAIRS]
    sampled, _ = distillation.sample_completions(
        TrainState.create(jaxpt.models.from_pretrained(student_dir), optax.sgd(0.0)),
        [{"prompt_ids": p} for p in prompts], TOKENIZER, gold.distillation_config(config), key=jax.random.key(123),
        mesh=None, prompt_buckets=[16])
    batch = gold.uld_batch(sampled, [gold.teacher_prompt_ids(p, TOKENIZER, TEACHER_TOKENIZER) for p in prompts],
                           TOKENIZER, TEACHER_TOKENIZER, config)
    hybrid = gold.hybrid_vocabulary(TOKENIZER, TEACHER_TOKENIZER, student_vocab_size=VOCAB,
                                    teacher_vocab_size=TEACHER_VOCAB)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)

    def uld(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss, _ = gold.uld_loss_fn(params, graphdef, teacher_params, teacher_graphdef,
                                   {k: jnp.asarray(v) for k, v in batch.items()}, config, hybrid, 8.0, 1.0)
        return float(loss)

    before = uld(jaxpt.models.from_pretrained(student_dir))
    after = uld(jaxpt.models.from_pretrained(out / "final"))
    assert after < 0.85 * before, (before, after)  # 0.240 -> 0.196 in 12 steps


def test_same_tokenizer_gold_is_distillation_at_its_temperature(tmp_path):
    """`use_uld_loss=False`: GOLD's step is `jaxpt.distillation`'s with GOLD's temperature in the divergence."""
    config = gold.distillation_config(gold.GOLDConfig(output_dir=str(tmp_path), temperature=0.7, beta=0.2, top_k=3))
    assert (config.temperature, config.beta, config.top_p, config.top_k, config.lmbda) == (0.7, 0.2, 0.95, 3, 0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        gold.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list([{"prompt": "ab"}] * 8),
                   gold.GOLDConfig(output_dir=str(tmp_path), lmbda=1.0), teacher_model=tiny_llama(TEACHER_VOCAB))


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_same_tokenizer_loss_matches_trl_generalized_jsd(beta):
    """TRL's `GOLDTrainer.generalized_jsd_loss` at GOLD's temperature against the stable loss GOLD's step runs."""
    from jaxpt.losses.distillation import distillation_loss

    rng = np.random.default_rng(1)
    student, teacher = ((rng.normal(size=(2, 4, 9)) * 2).astype(np.float32) for _ in range(2))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = GOLDTrainer.generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher),
                                                labels=torch.tensor(np.where(mask > 0, 5, -100)), beta=beta,
                                                temperature=0.9, num_items_in_batch=6)
    loss, _ = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), beta=beta,
                                temperature=0.9, num_tokens=6)
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
