"""Distillation: the generalized JSD against TRL's own loss function (values, gradients, entropy), against the
formula in float64, chunked and sharded equal unchunked and unsharded, a student that gets closer to its teacher,
and `jaxpt distillation` end to end."""

import json
import math

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from trl.trainer.distillation_trainer import _chunked_divergence_loss

import jaxpt.models
from jaxpt import cli, distillation
from jaxpt.losses.distillation import distillation_loss, distillation_loss_from_hidden, generalized_jsd
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
BETAS = (0.0, 0.3, 0.5, 1.0)
PAIRS = [("ab", "cd"), ("e", "fgh"), ("ij", "k"), ("lmn", "op")] * 4


def random_case(seed=0, batch=3, seq=6, vocab=13):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=(batch, seq, vocab)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(batch, seq, vocab)) * 2).astype(np.float32)
    mask = (rng.random((batch, seq)) > 0.3).astype(np.int64)
    mask[0, 0] = 1
    return student, teacher, mask


def trl_loss(student, teacher, mask, beta, temperature, *, student_weight=None, teacher_weight=None,
             num_items_in_batch=None, teacher_softcap=None):
    """TRL's `_chunked_divergence_loss`; with identity heads its "hidden states" are the logits."""
    student = torch.tensor(student, requires_grad=True)
    weights = [torch.eye(student.shape[-1]) if w is None else torch.tensor(w, requires_grad=True)
               for w in (student_weight, teacher_weight)]
    loss, entropy_sum, count = _chunked_divergence_loss(
        student, torch.tensor(teacher), weights[0], weights[1], torch.tensor(mask), beta,
        num_items_in_batch=num_items_in_batch, temperature=temperature, teacher_final_logit_softcapping=teacher_softcap)
    loss.backward()
    grads = [student.grad.numpy()] + ([weights[0].grad.numpy()] if student_weight is not None else [])
    return loss.item(), (entropy_sum / count).item(), grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", BETAS)
def test_loss_and_gradient_match_trl(beta, temperature):
    student, teacher, mask = random_case()
    expected_loss, expected_entropy, (expected_grad,) = trl_loss(student, teacher, mask, beta, temperature)
    loss_fn = lambda s: distillation_loss(s, jnp.asarray(teacher), jnp.asarray(mask), beta=beta,  # noqa: E731
                                          temperature=temperature)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student))
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy"]), expected_entropy, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, atol=1e-6)
    assert float(loss) > 0.01


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_from_hidden_matches_trl_with_a_wider_teacher(beta):
    """Real output projections (teacher wider than the student, teacher softcapped), TRL's normalisation by the
    tokens of the whole accumulated batch, and gradients for the student's hidden states and head."""
    rng = np.random.default_rng(1)
    batch, seq, vocab = 2, 7, 17
    student_hidden = rng.normal(size=(batch, seq, 6)).astype(np.float32)
    teacher_hidden = rng.normal(size=(batch, seq, 9)).astype(np.float32)
    student_weight = rng.normal(size=(vocab, 6)).astype(np.float32)
    teacher_weight = rng.normal(size=(vocab, 9)).astype(np.float32)
    mask = (rng.random((batch, seq)) > 0.25).astype(np.int64)
    expected_loss, expected_entropy, (grad_hidden, grad_weight) = trl_loss(
        student_hidden, teacher_hidden, mask, beta, 0.8, student_weight=student_weight, teacher_weight=teacher_weight,
        num_items_in_batch=20, teacher_softcap=3.0)

    def loss_fn(hidden, weight):
        return distillation_loss_from_hidden(hidden, weight, jnp.asarray(teacher_hidden), jnp.asarray(teacher_weight),
                                             jnp.asarray(mask), beta=beta, temperature=0.8, num_tokens=20,
                                             teacher_logit_softcap=3.0, chunk_size=4)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(student_hidden), jnp.asarray(student_weight))
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy"]), expected_entropy, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), grad_hidden, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), grad_weight, atol=1e-5)


def test_formula_in_float64():
    """D_beta written out in float64 (mixture, both KL terms; the endpoints are the forward and reverse KL)."""
    student, teacher, mask = random_case(seed=2)
    temperature = 1.3

    def log_softmax(z):
        z = z.astype(np.float64) / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_ps, log_pt = log_softmax(student), log_softmax(teacher)
    ps, pt = np.exp(log_ps), np.exp(log_pt)
    for beta in BETAS:
        if beta == 0.0:
            per_token = (pt * (log_pt - log_ps)).sum(-1)
        elif beta == 1.0:
            per_token = (ps * (log_ps - log_pt)).sum(-1)
        else:
            m = (1 - beta) * ps + beta * pt
            per_token = beta * (pt * (log_pt - np.log(m))).sum(-1) + (1 - beta) * (ps * (log_ps - np.log(m))).sum(-1)
        divergence, entropy = generalized_jsd(jnp.asarray(student), jnp.asarray(teacher), beta=beta,
                                              temperature=temperature)
        np.testing.assert_allclose(np.asarray(divergence), per_token, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(entropy), -(ps * log_ps).sum(-1), rtol=1e-5)
        loss, _ = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), beta=beta,
                                    temperature=temperature)
        np.testing.assert_allclose(float(loss), (per_token * mask).sum() / mask.sum(), rtol=2e-5)
    with pytest.raises(ValueError, match="beta=1.5 must be in"):
        generalized_jsd(jnp.asarray(student), jnp.asarray(teacher), beta=1.5)


def test_chunked_loss_never_holds_the_batch_logits():
    """Loss and gradient of 4 x 256 tokens over a vocabulary of 8192, in chunks of 128 tokens: XLA's temporaries
    stay under half of one model's `[tokens, vocab]` float32 logits (32 MiB; both models' would be 64 MiB)."""
    batch, seq, vocab = 4, 256, 8192

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask):
        return distillation_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                             beta=0.5, chunk_size=128)[0]

    shapes = ((batch, seq, 16), (vocab, 16), (batch, seq, 24), (vocab, 24), (batch, seq))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        *(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)).compile()
    full_logits = batch * seq * vocab * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits / 2


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_completion_length=8,
                    learning_rate=1e-2, max_steps=4, logging_steps=1, mesh_fsdp=1, disable_tqdm=True, save_steps=0,
                    save_final_model=False, seed=0, beta=0.5)
    settings.update(overrides)
    return distillation.DistillationConfig(**settings)


@pytest.fixture(scope="module")
def teacher():
    # sharper than the student (larger weights), wider and deeper: a distribution worth matching
    return tiny_llama(VOCAB, seed=7, hidden_size=48, num_hidden_layers=3, initializer_range=0.3)


def fixed_batch(count=8, accumulation=1):
    rows = [(TOKENIZER(p)["input_ids"], TOKENIZER(c + "</s>")["input_ids"]) for p, c in PAIRS[:count]]
    arrays = distillation.collate_completions([r[0] for r in rows], [r[1] for r in rows], prompt_length=4,
                                              completion_length=6, pad_token_id=0)
    return {k: v.reshape(accumulation, count // accumulation, *v.shape[1:]) for k, v in arrays.items()}


def run_step(cfg, teacher_model, batch, mesh=None):
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0), mesh=mesh)
    graphdef, params = nnx.split(teacher_model, nnx.Param)
    sharding = distillation.teacher_shardings(params, teacher_model, mesh)
    if mesh is not None:
        params = jax.device_put(params, sharding)
    step = distillation.make_train_step(cfg, teacher_graphdef=graphdef, mesh=mesh, state_sharding=state.shardings(mesh),
                                        teacher_sharding=sharding)
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True), params)
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


def test_step_equals_logits_loss_and_is_the_same_sharded_and_accumulated(tmp_path, teacher):
    cfg = config(tmp_path, logits_chunk_size=8)
    batch = fixed_batch()
    params, metrics = run_step(cfg, teacher, batch)

    # the same loss from full logits of both models
    flat = {k: v[0] for k, v in batch.items()}
    student = tiny_llama(VOCAB, seed=0)
    prompt_length = flat["prompt_ids"].shape[1]
    ids = np.concatenate([flat["prompt_ids"], flat["completion_ids"]], 1)
    mask = np.concatenate([flat["prompt_mask"], flat["attention_mask"]], 1)
    window = slice(prompt_length - 1, ids.shape[1] - 1)
    expected, expected_metrics = distillation_loss(student(ids, attention_mask=mask)[:, window],
                                                   teacher(ids, attention_mask=mask)[:, window],
                                                   flat["completion_mask"], beta=0.5)
    np.testing.assert_allclose(metrics["loss"], float(expected), rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], float(expected_metrics["entropy"]), rtol=1e-5)
    assert metrics["loss"] > 0.05 and metrics["grad_norm"] > 0

    sharded_params, sharded_metrics = run_step(cfg, teacher, batch, mesh=make_mesh(fsdp=8))
    accumulated_params, accumulated_metrics = run_step(cfg, teacher, fixed_batch(accumulation=4))
    for other_params, other_metrics in ((sharded_params, sharded_metrics), (accumulated_params, accumulated_metrics)):
        for name in ("loss", "entropy", "grad_norm"):
            np.testing.assert_allclose(other_metrics[name], metrics[name], rtol=2e-5)
        for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_student_gets_closer_to_the_teacher(tmp_path, teacher):
    """Half the steps on completions the student samples, half on the dataset's (lmbda=0.5): the divergence on a
    fixed batch falls, and the metrics carry TRL's names."""
    dataset = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])
    student = tiny_llama(VOCAB, seed=0)
    cfg = config(tmp_path, max_steps=20, learning_rate=1e-2, logging_steps=10, beta=0.5, lmbda=0.5,
                 eval_strategy="steps", eval_steps=10)
    on_policy = [distillation.is_on_policy_step(step, cfg) for step in range(20)]
    assert 5 <= on_policy.count(True) <= 15
    graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    eval_step = distillation.make_eval_step(cfg, teacher_graphdef=graphdef)

    def divergence(model):
        state = TrainState.create(model, optax.sgd(0.0))
        pairs = eval_step(state, fixed_batch(), teacher_params)
        return float(pairs["loss"][0] / pairs["loss"][1])

    before = divergence(student)
    eval_dataset = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS[:3]])
    result = distillation.train(student, TOKENIZER, dataset, cfg, teacher_model=teacher, eval_dataset=eval_dataset)
    after = divergence(result.state.model())
    assert after < 0.6 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_loss" in r]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [10, 20] and [r["step"] for r in evaluations] == [10, 20]
    assert all(r["eval_loss"] > 0 and r["eval_entropy"] > 0 for r in evaluations)
    assert {"loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "completions/mean_length",
            "completions/clipped_ratio"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, teacher, monkeypatch):
    """A crash after the checkpoint of step 2, resumed: the same prompts, the same on-policy choices and samples
    (both drawn from the seed and the step), so the same losses as the run that was not interrupted."""
    dataset = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])
    cfg = config(tmp_path / "full", lmbda=0.5, max_steps=4, learning_rate=1e-2)
    full = distillation.train(tiny_llama(VOCAB, seed=0), TOKENIZER, dataset, cfg, teacher_model=teacher).metrics
    resumed_cfg = cfg.replace(output_dir=str(tmp_path / "resumed"), save_steps=2)
    real_choice = distillation.is_on_policy_step

    def crashing_choice(step, config):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_choice(step, config)

    monkeypatch.setattr(distillation, "is_on_policy_step", crashing_choice)
    with pytest.raises(KeyboardInterrupt):
        distillation.train(tiny_llama(VOCAB, seed=0), TOKENIZER, dataset, resumed_cfg, teacher_model=teacher)
    monkeypatch.setattr(distillation, "is_on_policy_step", real_choice)
    distillation.train(tiny_llama(VOCAB, seed=5), TOKENIZER, dataset,
                       resumed_cfg.replace(resume_from_checkpoint="latest"), teacher_model=teacher)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["completions/mean_length"] == b["completions/mean_length"]


def test_off_policy_examples_hold_the_dataset_completions(tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    cfg = config(tmp_path, lmbda=0.0, max_completion_length=3)
    examples = distillation.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, cfg)
    assert TOKENIZER.decode(examples[0]["completion_ids"]) == "cd</s>"
    assert TOKENIZER.decode(examples[1]["completion_ids"]) == "fgh"  # cut to max_completion_length
    assert TOKENIZER.decode(examples[1]["completion_prompt_ids"]) == "e"
    arrays, stats = distillation.dataset_completions(examples[:2], TOKENIZER, prompt_buckets=[16],
                                                     completion_buckets=[16])
    assert arrays["completion_ids"].shape == (2, 16) and arrays["prompt_ids"].shape == (2, 16)
    assert arrays["completion_mask"].sum(1).tolist() == [3, 3]
    assert stats["completions/clipped_ratio"] == 0.5  # "fgh" lost its EOS to the cut
    messages = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    conversational = distillation.prepare_dataset(datasets.Dataset.from_list(messages), TOKENIZER,
                                                  config(tmp_path, lmbda=0.5))
    assert TOKENIZER.decode(conversational[0]["completion_ids"]).startswith("cd")
    assert conversational[0]["prompt_ids"] == conversational[0]["completion_prompt_ids"]


def test_bad_inputs_fail_early(tmp_path, teacher):
    with pytest.raises(ValueError, match="beta=1.5 must be in"):
        config(tmp_path, beta=1.5)
    with pytest.raises(ValueError, match="lmbda=-0.1 must be in"):
        config(tmp_path, lmbda=-0.1)
    prompts = datasets.Dataset.from_list([{"prompt": p} for p, _ in PAIRS])
    with pytest.raises(ValueError, match="prompt-only dataset"):
        distillation.prepare_dataset(prompts, TOKENIZER, config(tmp_path, lmbda=0.5))
    with pytest.raises(ValueError, match="vocabulary"):
        distillation.train(tiny_llama(VOCAB, seed=0), TOKENIZER, prompts, config(tmp_path),
                           teacher_model=tiny_llama(VOCAB + 4, seed=1))
    texts = datasets.Dataset.from_list([{"text": "abc"}])
    with pytest.raises(ValueError, match="needs prompts"):
        distillation.prepare_dataset(texts, TOKENIZER, config(tmp_path))


def test_distillation_command_trains_and_exports(tmp_path, teacher):
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for directory, model in ((student_dir, tiny_llama(VOCAB, seed=0)), (teacher_dir, teacher)):
        TOKENIZER.save_pretrained(directory)
        jaxpt.models.save_pretrained(model, directory)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p, _ in PAIRS) + "\n")
    out = tmp_path / "out"
    code = cli.main(["distillation", "--model_name_or_path", str(student_dir), "--teacher_model_name_or_path",
                     str(teacher_dir), "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "3",
                     "--logging_steps", "1", "--per_device_train_batch_size", "4", "--max_completion_length", "6",
                     "--learning_rate", "0.01", "--beta", "0.0", "--temperature", "0.9", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    with pytest.raises(ValueError, match="--teacher_model_name_or_path"):
        cli.main(["distillation", "--model_name_or_path", str(student_dir), "--dataset_name", str(data),
                  "--output_dir", str(tmp_path / "other")])


def test_distillation_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distillation", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--teacher_model_name_or_path", "--beta", "--lmbda", "--temperature", "--max_completion_length"):
        assert flag in help_text


def test_first_step_matches_trl_compute_loss(tmp_path, teacher):
    """TRL's `DistillationTrainer._compute_loss` (its backbone forward, head projection and chunked divergence) on the
    transformers copies of the same student and teacher, on the same completions: loss, entropy and the gradient's
    global norm equal jaxpt's first step. The trainer is bare (no `__init__`) with the attributes the method reads;
    prompts have one length, as TRL's position ids ignore left padding."""
    from trl.models.utils import _ForwardRedirection
    from trl.trainer.distillation_trainer import DistillationTrainer

    student = tiny_llama(VOCAB, seed=0)
    hf_models = []
    for name, model in (("student", student), ("teacher", teacher)):
        jaxpt.models.save_pretrained(model, tmp_path / name)
        hf_models.append(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32))
    hf_student, hf_teacher = hf_models
    trainer = object.__new__(DistillationTrainer)
    trainer.teacher_model, trainer.beta, trainer.temperature = hf_teacher, 0.3, 0.9
    trainer.model_kwarg_keys, trainer._is_vlm = (), False
    trainer._forward_redirection = _ForwardRedirection()
    trainer.accelerator = type("Accelerator", (), {"unwrap_model": staticmethod(lambda model: model),
                                                   "is_main_process": True})()

    prompts = ["ab", "cd", "ef", "gh"]
    completions = ["ijk</s>", "l</s>", "mnopq", "rs</s>"]
    arrays = distillation.collate_completions([TOKENIZER(p)["input_ids"] for p in prompts],
                                              [TOKENIZER(c)["input_ids"] for c in completions], prompt_length=2,
                                              completion_length=5, pad_token_id=0)
    inputs = {"prompt_ids": torch.tensor(arrays["prompt_ids"]), "prompt_mask": torch.tensor(arrays["prompt_mask"]),
              "completion_ids": torch.tensor(arrays["completion_ids"]),
              "completion_mask": torch.tensor(arrays["completion_mask"])}
    loss, entropy_sum, count = trainer._compute_loss(hf_student, inputs, int(arrays["completion_mask"].sum()))
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in hf_student.parameters() if p.grad is not None)).item()

    cfg = config(tmp_path / "run", beta=0.3, temperature=0.9, max_grad_norm=0.0)
    _, metrics = run_step(cfg, teacher, {k: v[None] for k, v in arrays.items()})
    np.testing.assert_allclose(metrics["loss"], loss.item(), rtol=1e-4)
    np.testing.assert_allclose(metrics["entropy"], (entropy_sum / count).item(), rtol=1e-4)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-3)
