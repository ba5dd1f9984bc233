"""SDFT against TRL 1.16's own code: `SDFTTrainer.compute_loss` (with its `_compute_teacher_student_logits`, which
skips the first tokens, and `_compute_self_distillation_loss`) driven with fixed logits (loss, gradient, metrics);
`DemonstrationTeacherContextBuilder`'s teacher prompts; the blocks marked as copies of SDPO's; and a tiny model whose
divergence to the demonstration-reading teacher falls under `train()`."""

import ast
import dataclasses
import inspect
import json
import re
import types
from collections import defaultdict
from contextlib import nullcontext

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl.experimental.sdft  # a test dependency: parity must fail, never skip, without it
from trl.experimental.sdft import sdft_trainer as trl_sdft

from jaxpt.experimental import sdft, sdpo
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama


def trl_config(tmp_path, **options):
    options = {"num_generations": 2, "per_device_train_batch_size": 4, **options}
    return trl.experimental.sdft.SDFTConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                                            **options)


def trl_compute_loss(args, student_logits, teacher_logits, completion_ids, completion_mask, old_logps=None):
    """`SDFTTrainer.compute_loss` on a stand-in trainer whose forward passes return the given logits."""
    student_model, teacher_model = types.SimpleNamespace(training=True), object()
    trainer = types.SimpleNamespace(
        args=args, _name="SDFT", _metrics={"train": defaultdict(list)}, model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(gather=lambda x: x), current_gradient_accumulation_steps=1,
        use_teacher_server=False, teacher_model=teacher_model, num_loss_tokens_to_skip=args.num_loss_tokens_to_skip,
        _get_teacher_context_for_self_distillation=nullcontext)
    trainer._forward_logits = lambda model, **kwargs: student_logits if model is student_model else teacher_logits
    for name in ("_compute_self_distillation_loss", "_compute_teacher_student_logits",
                 "_log_self_distillation_metric"):
        setattr(trainer, name, types.MethodType(getattr(trl_sdft.SDFTTrainer, name), trainer))
    rows = completion_ids.shape[0]
    inputs = {"completion_ids": completion_ids, "completion_mask": completion_mask,
              "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "teacher_input_ids": torch.zeros(rows, 2, dtype=torch.long),
              "teacher_attention_mask": torch.ones(rows, 2, dtype=torch.long)}
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    loss = trl_sdft.SDFTTrainer.compute_loss(trainer, student_model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


ROWS, SEQ, V = 4, 6, 11
CASES = [  # mode, alpha, topk, add_tail, num_loss_tokens_to_skip
    ("topk_logits", 0.5, 4, False, 0),
    ("topk_logits", 0.2, 5, True, 2),
    ("full_logits", 0.0, None, False, 1),
    ("sampled_token", 1.0, None, False, 0),
]


@pytest.mark.parametrize("with_old", [False, True], ids=["on-policy", "old-logps"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-a{c[1]}-skip{c[4]}" for c in CASES])
def test_loss_gradient_and_metrics_match_trl(tmp_path, case, with_old):
    mode, alpha, topk, tail, skip = case
    rng = np.random.default_rng(0)
    student, teacher = (rng.normal(size=(ROWS, SEQ, V)).astype(np.float32) * 2 for _ in range(2))
    ids = rng.integers(0, V, size=(ROWS, SEQ))
    mask = np.ones((ROWS, SEQ), np.float32)
    mask[0, 4:], mask[2, 3:], mask[3, 1:] = 0, 0, 0  # row 3 keeps one token: nothing after skipping
    logps = np.asarray(jax.nn.log_softmax(student))[np.arange(ROWS)[:, None], np.arange(SEQ)[None], ids]
    old = logps + rng.normal(size=(ROWS, SEQ)).astype(np.float32) * 0.5
    args = trl_config(tmp_path, distillation_mode=mode, distillation_alpha=alpha, distillation_topk=topk,
                      distillation_add_tail=tail, num_loss_tokens_to_skip=skip)
    student_torch = torch.tensor(student, requires_grad=True)
    trl_loss, trl_metrics = trl_compute_loss(args, student_torch, torch.tensor(teacher), torch.tensor(ids),
                                             torch.tensor(mask), torch.tensor(old) if with_old else None)
    trl_loss.backward()

    def loss(student_logits):
        per_token, student_logps = sdft.self_distillation_divergence(
            student_logits, jnp.asarray(teacher), jnp.asarray(ids), distillation_mode=mode, distillation_alpha=alpha,
            distillation_topk=topk, distillation_add_tail=tail)
        return sdft.sdft_loss(per_token, student_logps, jnp.asarray(old) if with_old else None,
                              jnp.asarray(sdft.loss_mask(mask, skip)))

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(student))
    np.testing.assert_allclose(float(value), trl_loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), student_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert set(metrics) == set(trl_metrics) == {"self_distillation/distillation_loss", "sdft/distillation_loss"}
    for name, trl_value in trl_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), trl_value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(student_torch.grad.numpy()).max() > 1e-3


def test_teacher_prompts_match_trl_builder(tmp_path):
    """Standard and conversational prompts, string and message contexts: TRL's builder tokenizes what we build."""
    config = sdft.SDFTConfig(output_dir=str(tmp_path),
                             teacher_prompt_template="Q: {prompt}\nHint: {privileged_context}")
    args = trl_config(tmp_path, teacher_prompt_template=config.teacher_prompt_template)
    rows = [("1+2=", "the sum is 3"),
            ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "4+4="}],
             [{"role": "assistant", "content": "8"}, {"role": "user", "content": [{"type": "text", "text": "yes"}]}])]
    for prompt, context in rows:
        seen = []

        def tokenize(prompts, seen=seen):
            seen.extend(prompts)
            return [[5]] * len(prompts)

        trainer = types.SimpleNamespace(args=args, _tokenizer=TOKENIZER, _tokenize_prompts=tokenize)
        builder = trl_sdft.DemonstrationTeacherContextBuilder(trainer)
        builder.build([prompt], [context], torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
        assert seen == [sdft.teacher_prompt(prompt, context, config)]
    with pytest.raises(ValueError, match="privileged_context is None"):
        sdft.teacher_prompt("1+2=", None, config)


def test_config_defaults_match_trl(tmp_path):
    ours, theirs = sdft.SDFTConfig(output_dir=str(tmp_path)), trl_config(tmp_path, num_generations=8,
                                                                         per_device_train_batch_size=8)
    checked = [name for name in sdft.SDFTConfig.__annotations__ if hasattr(theirs, name)
               and name not in ("generation_batch_size", "steps_per_generation", "learning_rate")]
    assert len(checked) > 15
    for name in checked:
        assert getattr(ours, name) == getattr(theirs, name), name
    with pytest.raises(ValueError, match="must contain both"):
        sdft.SDFTConfig(output_dir=str(tmp_path), teacher_prompt_template="{prompt}")
    with pytest.raises(ValueError, match="needs distillation_alpha=1.0"):
        sdft.SDFTConfig(output_dir=str(tmp_path), distillation_mode="sampled_token")


def test_marked_copies_match_sdpo():
    """Every block of sdft.py marked `# Copied from jaxpt.experimental.sdpo.NAME` is SDPO's block, verbatim."""
    source = inspect.getsource(sdft)
    marked = re.findall(r"^# Copied from jaxpt\.experimental\.sdpo\.(\w+)$", source, flags=re.MULTILINE)
    assert len(marked) >= 10

    def blocks(module):
        text = inspect.getsource(module)
        lines = text.splitlines()
        found = {}
        for node in ast.parse(text).body:
            name = getattr(node, "name", None) or (node.targets[0].id if isinstance(node, ast.Assign) else None)
            if name:
                found[name] = "\n".join(lines[node.lineno - 1:node.end_lineno])
        return found

    ours, theirs = blocks(sdft), blocks(sdpo)
    for name in marked:
        assert ours[name] == theirs[name], name


def test_training_lowers_the_divergence(tmp_path):
    """A tiny model learns, on its own samples, to predict what its demonstration-reading self (the base teacher)
    predicts: the top-k JSD falls over six steps; the eval loss is logged."""
    rows = [{"prompt": f"{a}+{b}=", "privileged_context": f"answer {a + b}"} for a, b in ((3, 4), (5, 1))]
    config = sdft.SDFTConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                             per_device_eval_batch_size=4, max_completion_length=6, learning_rate=3e-3,
                             distillation_topk=20, mesh_fsdp=1, max_steps=6, logging_steps=1, save_steps=0,
                             eval_strategy="steps", eval_steps=6, disable_tqdm=True, save_final_model=False)
    result = sdft.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(rows), config,
                        eval_dataset=datasets.Dataset.from_list(rows[:1]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in train_records]
    assert len(losses) == 6 and losses[0] > 1e-3 and losses[-1] < 0.5 * losses[0], losses
    assert train_records[-1]["sdft/distillation_loss"] == train_records[-1]["self_distillation/distillation_loss"]
    assert np.isfinite(train_records[-1]["completions/mean_length"])
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and 0 < evals[0]["eval_loss"] < losses[0]
    assert result.state.step == 6
    assert dataclasses.is_dataclass(config)


def test_ema_teacher_resumes_exactly(tmp_path):
    """The EMA teacher (moved after every step) is saved with the checkpoints: a run resumed from step 2 logs the
    uninterrupted run's step-3 losses and ends with its parameters."""
    rows = datasets.Dataset.from_list([{"prompt": f"{a}+{b}=", "privileged_context": f"answer {a + b}"}
                                       for a, b in ((3, 4), (5, 1))])
    config = sdft.SDFTConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                             max_completion_length=6, learning_rate=3e-2, distillation_topk=20, mesh_fsdp=1,
                             max_steps=3, logging_steps=1, save_steps=2, disable_tqdm=True, save_final_model=False,
                             teacher_model_kind="ema", teacher_update_rate=0.5)
    full = sdft.train(tiny_llama(VOCAB), TOKENIZER, rows, config)
    full_params = [np.asarray(leaf) for leaf in jax.tree.leaves(full.state.params)]
    resumed = sdft.train(tiny_llama(VOCAB), TOKENIZER, rows, dataclasses.replace(config,
                                                                                 resume_from_checkpoint="latest"))
    assert [r["step"] for r in resumed.metrics] == [3]
    for key in ("loss", "sdft/distillation_loss"):
        assert resumed.metrics[0][key] == pytest.approx(full.metrics[2][key], rel=1e-5, abs=1e-7), key
    for expected, leaf in zip(full_params, jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-5, atol=1e-7)
