"""GKD: the loss against TRL 1.16's `GKDTrainer.generalized_jsd_loss` (values and gradients), jaxpt's first step
against TRL's `GKDTrainer.compute_loss` on the same tiny models (the divergence at temperature 1 whatever the sampling
temperature), and `jaxpt gkd` with sequence-level KD bringing a student closer to its teacher."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from trl.experimental.gkd import GKDTrainer  # a test dependency: parity must fail, never skip, without it

import jaxpt.models
from jaxpt import cli, distillation
from jaxpt.experimental import gkd
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama

PAIRS = [("ab", "cd"), ("e", "fgh"), ("ij", "k"), ("lmn", "op")] * 4


@pytest.fixture(scope="module")
def teacher():
    # sharper (larger weights) and wider than the student: a distribution worth matching
    return tiny_llama(VOCAB, seed=7, hidden_size=48, initializer_range=0.3)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_loss_matches_trl(beta, temperature):
    rng = np.random.default_rng(0)
    student, teacher_logits = (rng.normal(size=(3, 5, 11)).astype(np.float32) * 2 for _ in range(2))
    mask = (rng.random((3, 5)) > 0.3).astype(np.int64)
    labels = np.where(mask > 0, 1, -100)
    for num_items in (None, 17):
        student_torch = torch.tensor(student, requires_grad=True)
        expected = GKDTrainer.generalized_jsd_loss(student_torch, torch.tensor(teacher_logits),
                                                   labels=torch.tensor(labels), beta=beta, temperature=temperature,
                                                   num_items_in_batch=num_items)
        expected.backward()

        def loss_fn(logits, num_items=num_items):
            return gkd.generalized_jsd_loss(logits, jnp.asarray(teacher_logits), jnp.asarray(mask), beta=beta,
                                            temperature=temperature, num_tokens=num_items)[0]

        loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student))
        np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), student_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
        assert expected.item() > 0.01


def test_first_step_matches_trl_compute_loss(tmp_path, teacher):
    """TRL's `GKDTrainer.compute_loss` (a bare trainer with the attributes it reads) on the transformers copies of the
    same student and teacher, on one batch of prompt + completion rows (labels -100 on prompts and padding): its loss
    and gradient norm equal jaxpt's first GKD step. The config's sampling temperature (0.5) must not reach the loss.
    Prompts have one length, as TRL's position ids ignore left padding."""
    student = tiny_llama(VOCAB, seed=0)
    hf = {}
    for name, model in (("student", student), ("teacher", teacher)):
        jaxpt.models.save_pretrained(model, tmp_path / name)
        hf[name] = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
    trainer = object.__new__(GKDTrainer)
    trainer.teacher_model, trainer.beta = hf["teacher"], 0.3

    prompts, completions = ["ab", "cd", "ef", "gh"], ["ijk</s>", "l</s>", "mnopq", "rs</s>"]
    arrays = distillation.collate_completions([TOKENIZER(p)["input_ids"] for p in prompts],
                                              [TOKENIZER(c)["input_ids"] for c in completions], prompt_length=2,
                                              completion_length=5, pad_token_id=0)
    input_ids = np.concatenate([arrays["prompt_ids"], arrays["completion_ids"]], 1)
    attention_mask = np.concatenate([arrays["prompt_mask"], arrays["attention_mask"]], 1)
    labels = np.where(np.concatenate([np.zeros_like(arrays["prompt_mask"]), arrays["completion_mask"]], 1) > 0,
                      input_ids, -100)
    inputs = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
              "labels": torch.tensor(labels)}
    loss = trainer.compute_loss(hf["student"], inputs, num_items_in_batch=int(arrays["completion_mask"].sum()))
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in hf["student"].parameters())).item()

    config = gkd.GKDConfig(output_dir=str(tmp_path / "run"), beta=0.3, temperature=0.5, max_grad_norm=0.0,
                           mesh_fsdp=1)
    state = TrainState.create(student, optax.sgd(1.0))
    graphdef, params = nnx.split(teacher, nnx.Param)
    step = distillation.make_train_step(gkd.distillation_config(config, loss=True), teacher_graphdef=graphdef)
    _, metrics = step(state, {k: v[None] for k, v in arrays.items()}, params)
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-3)
    # at the sampling temperature the divergence differs: the check above tells the two apart
    with torch.no_grad():
        logits = [m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
                  for m in (hf["student"], hf["teacher"])]
        hot = GKDTrainer.generalized_jsd_loss(*logits, labels=inputs["labels"][:, 1:], beta=0.3, temperature=0.5)
    assert abs(hot.item() - loss.item()) > 0.05 * loss.item()


def test_config_names_defaults_and_errors(tmp_path):
    config = gkd.GKDConfig(output_dir=str(tmp_path))
    assert (config.temperature, config.lmbda, config.beta, config.max_new_tokens, config.seq_kd,
            config.learning_rate) == (0.9, 0.5, 0.5, 128, False, 2e-5)
    with pytest.raises(ValueError, match="lmbda=1.5 must be in"):
        gkd.GKDConfig(output_dir=str(tmp_path), lmbda=1.5)
    with pytest.raises(ValueError, match="beta=-0.5 must be in"):
        gkd.GKDConfig(output_dir=str(tmp_path), beta=-0.5)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        gkd.GKDConfig(output_dir=str(tmp_path), max_new_tokens=0)


def test_gkd_command_with_seq_kd_brings_the_student_closer(tmp_path, teacher):
    """`jaxpt gkd` on prompt-only rows with `seq_kd` and `lmbda=0` (every step learns from the teacher's samples;
    the on-policy steps are `jaxpt.distillation`'s, tested there): the divergence to the teacher on a fixed batch
    falls, the metrics carry TRL's names, the student is exported."""
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for directory, model in ((student_dir, tiny_llama(VOCAB, seed=0)), (teacher_dir, teacher)):
        TOKENIZER.save_pretrained(directory)
        jaxpt.models.save_pretrained(model, directory)
    rows = tmp_path / "train.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p}) for p, _ in PAIRS) + "\n")
    out = tmp_path / "out"
    code = cli.main(["gkd", "--model_name_or_path", str(student_dir), "--teacher_model_name_or_path",
                     str(teacher_dir), "--dataset_name", str(rows), "--output_dir", str(out), "--max_steps", "12",
                     "--logging_steps", "6", "--per_device_train_batch_size", "8", "--max_new_tokens", "6",
                     "--learning_rate", "0.03", "--seq_kd", "true", "--lmbda", "0.0", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true", "--save_steps", "0", "--seed", "0"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12]
    assert {"loss", "grad_norm", "entropy", "completions/mean_length"} <= set(records[0])
    # the divergence on completions the teacher samples for the prompts (another draw than training's)
    config = gkd.GKDConfig(output_dir=str(tmp_path / "eval"), max_new_tokens=6, mesh_fsdp=1)
    graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    batch, _ = gkd.teacher_completions(graphdef, teacher_params, [{"prompt_ids": TOKENIZER(p)["input_ids"]}
                                                                  for p, _ in PAIRS[:8]], TOKENIZER,
                                       gkd.distillation_config(config), key=jax.random.key(123), mesh=None,
                                       prompt_buckets=[16])
    ids = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["attention_mask"]], 1)

    def divergence(model):  # the GKD loss at temperature 1 on the completions of a fixed batch
        window = slice(15, ids.shape[1] - 1)
        student_logits, teacher_logits = (m(ids, attention_mask=mask)[:, window] for m in (model, teacher))
        return float(gkd.generalized_jsd_loss(student_logits, teacher_logits, batch["completion_mask"])[0])

    before = divergence(jaxpt.models.from_pretrained(student_dir))
    after = divergence(jaxpt.models.from_pretrained(out / "final"))
    assert after < 0.9 * before, (before, after)  # 0.331 -> 0.283 in 12 steps
