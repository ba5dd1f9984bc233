"""Checkpoint safety: no fresh run mixes with an earlier one, no resume into another run's state, damaged
checkpoints are skipped or named, no lost save, and a killed-then-resumed run logs exactly what the uninterrupted
run logs (one metrics line per step, bitwise-equal losses)."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import optax
import pytest

from jaxpt import dpo, loop, sft
from jaxpt.checkpoint import Checkpointer, DamagedCheckpointError
from jaxpt.train_state import TrainState, make_optimizer
from tests.helpers import arithmetic_texts, char_tokenizer, marker_preferences, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
DATASET = datasets.Dataset.from_list(arithmetic_texts(32))
STEPS, SAVE_STEPS = 6, 3  # the reference run saves checkpoints 3 and 6


def config(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=3e-3, max_steps=STEPS, save_steps=SAVE_STEPS, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return sft.SFTConfig(**settings)


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def saved_steps(output_dir):
    return sorted(int(p.name) for p in (Path(output_dir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted SFT run: metrics of every step, checkpoints 3 and 6."""
    output_dir = tmp_path_factory.mktemp("reference")
    sft.train(tiny_llama(VOCAB), TOKENIZER, DATASET, config(output_dir))
    assert saved_steps(output_dir) == [3, 6]
    return output_dir


@pytest.fixture
def run_copy(reference_run, tmp_path):
    """A private copy of the reference run's output_dir, free to damage."""
    return Path(shutil.copytree(reference_run, tmp_path / "run"))


@pytest.fixture
def jaxpt_log(caplog):
    """The records of the "jaxpt" logger (captured even if it does not propagate to the root logger)."""
    jaxpt_logger = logging.getLogger("jaxpt")
    jaxpt_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="jaxpt")
    yield caplog
    jaxpt_logger.removeHandler(caplog.handler)


def resume_directly(cfg, method="sft", **model_overrides):
    """`loop.resume` as a method's train() calls it, without training (nothing compiles)."""
    model = tiny_llama(VOCAB, seed=99, **model_overrides)
    state = TrainState.create(model, make_optimizer(cfg, STEPS)[0])
    checkpoints = loop.checkpointer(cfg, method=method, model=model)
    try:
        return loop.resume(cfg, state, None, checkpoints)
    finally:
        checkpoints.close()


# ---------------------------------------------------------------------------------------------------------------
# Fresh runs, overwriting, fingerprints
# ---------------------------------------------------------------------------------------------------------------


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(run_copy):
    before = (run_copy / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=rf"output_dir='{run_copy}' already holds checkpoints \(3, 6\).*"
                                         r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        sft.train(tiny_llama(VOCAB), TOKENIZER, DATASET, config(run_copy))
    assert (run_copy / "metrics.jsonl").read_text() == before and saved_steps(run_copy) == [3, 6]


def test_overwrite_output_dir_clears_only_what_jaxpt_wrote_and_runs(run_copy):
    for name in ("final", "tensorboard"):
        (run_copy / name).mkdir()
        (run_copy / name / "file").write_text("old")
    (run_copy / "completions.jsonl").write_text('{"step": 0}\n')
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "data").mkdir()
    (run_copy / "data" / "train.jsonl").write_text("{}")
    sft.train(tiny_llama(VOCAB), TOKENIZER, DATASET, config(run_copy, overwrite_output_dir=True, max_steps=2,
                                                             save_steps=2))
    assert saved_steps(run_copy) == [2]
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2]
    assert not (run_copy / "final").exists() and not (run_copy / "tensorboard").exists()
    assert not (run_copy / "completions.jsonl").exists()
    assert (run_copy / "notes.txt").read_text() == "mine" and (run_copy / "data" / "train.jsonl").exists()


def test_overwrite_output_dir_contradicting_resume_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="overwrite_output_dir=True deletes the checkpoints that "
                                         "resume_from_checkpoint='latest'"):
        config(tmp_path, overwrite_output_dir=True, resume_from_checkpoint="latest")
    cfg = config(tmp_path, overwrite_output_dir=True, resume_from_checkpoint=str(tmp_path / "checkpoints" / "3"))
    with pytest.raises(ValueError, match="overwrite_output_dir=True would delete resume_from_checkpoint"):
        loop.prepare_output_dir(cfg)


def test_dpo_resume_in_an_sft_run_names_the_method(run_copy):
    preferences = datasets.Dataset.from_list(marker_preferences(8))
    cfg = dpo.DPOConfig(output_dir=str(run_copy), max_length=32, per_device_train_batch_size=4, max_steps=STEPS,
                        save_steps=SAVE_STEPS, mesh_fsdp=1, disable_tqdm=True, save_final_model=False,
                        resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"checkpoints/6 belongs to another run: method is 'sft' there and 'dpo'"):
        dpo.train(tiny_llama(VOCAB), TOKENIZER, preferences, cfg)
    assert saved_steps(run_copy) == [3, 6]


@pytest.mark.parametrize("overrides,model_overrides,message", [
    ({}, {"hidden_size": 48}, "hidden_size is 32 there and 48 in this run"),
    ({}, {"num_hidden_layers": 3}, "num_hidden_layers is 2 there and 3 in this run"),
    ({"max_grad_norm": 0.0}, {}, r"gradient_clipping \(max_grad_norm > 0 .*\) is True there and False"),
])
def test_resume_with_another_shape_is_refused_naming_the_field(run_copy, overrides, model_overrides, message):
    cfg = config(run_copy, resume_from_checkpoint="latest", **overrides)
    with pytest.raises(ValueError, match=message):
        resume_directly(cfg, **model_overrides)


def test_resume_with_another_data_order_warns(run_copy, jaxpt_log):
    _, step, _ = resume_directly(config(run_copy, resume_from_checkpoint="latest", seed=5))
    assert step == 6
    assert any("seed=5 (the checkpointed run had 0)" in r.getMessage() for r in jaxpt_log.records)


def test_a_save_that_does_not_happen_fails(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(0.1))
    checkpoints.save(5, state, {})
    with pytest.raises(RuntimeError, match=r"checkpoints/3 was not written.*\(step 5\)"):
        checkpoints.save(3, state, {})
    checkpoints.close()


@pytest.mark.parametrize("limit,kept", [(None, [1, 2, 3, 4]), (0, [1, 2, 3, 4]), (-1, [1, 2, 3, 4]), (2, [3, 4])])
def test_save_total_limit_zero_or_negative_keeps_all(tmp_path, limit, kept):
    checkpoints = Checkpointer(tmp_path, save_total_limit=limit)
    state = TrainState.create(tiny_llama(VOCAB), optax.sgd(0.1))
    for step in (1, 2, 3, 4):
        checkpoints.save(step, state, {})
    checkpoints.close()
    assert saved_steps(tmp_path) == kept


# ---------------------------------------------------------------------------------------------------------------
# Resume: nothing to resume, damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_latest_without_a_checkpoint_warns_and_starts_from_scratch(tmp_path, jaxpt_log):
    _, step, progress = resume_directly(config(tmp_path, resume_from_checkpoint="latest"))
    assert (step, progress) == (0, {})
    warnings = [r.getMessage() for r in jaxpt_log.records if r.levelno == logging.WARNING]
    assert any("holds no checkpoint: training starts from scratch" in m for m in warnings)


def test_explicit_checkpoint_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "elsewhere" / "checkpoints" / "7"
    with pytest.raises(ValueError, match=rf"resume_from_checkpoint='{missing}' does not exist"):
        sft.train(tiny_llama(VOCAB), TOKENIZER, DATASET, config(tmp_path, resume_from_checkpoint=str(missing)))
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        resume_directly(config(tmp_path, resume_from_checkpoint=str(tmp_path)))


def truncate_arrays(step_dir):
    files = list((step_dir / "state").glob("ocdbt.process_*/d/*"))
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated_arrays": truncate_arrays,
    "empty_progress": lambda step_dir: (step_dir / "progress" / "metadata").write_text(""),
    "missing_progress": lambda step_dir: shutil.rmtree(step_dir / "progress"),
    "missing_state": lambda step_dir: shutil.rmtree(step_dir / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_latest_falls_back_past_a_damaged_checkpoint(run_copy, jaxpt_log, damage):
    DAMAGE[damage](run_copy / "checkpoints" / "6")
    expected_tokens = Checkpointer(run_copy).read_progress(3)["num_tokens"]
    state, step, progress = resume_directly(config(run_copy, resume_from_checkpoint="latest"))
    assert step == 3 and int(state.step) == 3 and progress["num_tokens"] == expected_tokens
    damaged = run_copy / "checkpoints" / "6"
    warnings = [r.getMessage() for r in jaxpt_log.records if r.levelno == logging.WARNING]
    assert any(f"Checkpoint {damaged} is damaged" in m for m in warnings), warnings
    # Moved aside (not deleted), so the resumed run can save step 6 again; the log is cut back to step 3.
    assert saved_steps(run_copy) == [3] and (run_copy / "damaged_checkpoints" / "6").is_dir()
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_explicit_damaged_checkpoint_is_named_with_the_previous_good_one(run_copy, damage):
    damaged = run_copy / "checkpoints" / "6"
    DAMAGE[damage](damaged)
    with pytest.raises(ValueError, match=rf"Checkpoint {damaged} is damaged: .* The newest older checkpoint that "
                                         rf"looks complete is {run_copy / 'checkpoints' / '3'}"):
        resume_directly(config(run_copy, resume_from_checkpoint=str(damaged)))
    assert saved_steps(run_copy) == [3, 6]  # nothing moved when the user named the checkpoint


def test_every_checkpoint_damaged_is_an_error_naming_them(run_copy, jaxpt_log):
    DAMAGE["missing_state"](run_copy / "checkpoints" / "6")
    DAMAGE["empty_progress"](run_copy / "checkpoints" / "3")
    with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged \(.*checkpoints/6, .*checkpoints/3;"):
        resume_directly(config(run_copy, resume_from_checkpoint="latest"))


def test_damaged_checkpoint_error_is_a_value_error():
    assert issubclass(DamagedCheckpointError, ValueError)


def test_resume_from_an_older_checkpoint_with_newer_ones_present_is_refused(run_copy):
    with pytest.raises(ValueError, match=r"holds newer checkpoints \[6\] that its own saves would collide with"):
        resume_directly(config(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "3")))


def test_resume_cuts_metrics_and_completions_back_to_the_restored_step(tmp_path):
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 0.8},
               {"step": 3, "loss": 0.7}, {"step": 4, "loss": 0.6}, {"step": 4, "eval_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 0, 2, 4)))
    loop.truncate_logs(tmp_path, 2)
    assert read_metrics(tmp_path) == records[:3]
    assert [json.loads(line)["step"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()] == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------------------------


def test_kill_and_resume_logs_each_step_once_with_bitwise_equal_losses(reference_run, tmp_path, monkeypatch):
    """Killed while running step 6 (two steps past the checkpoint of step 3, whose metrics were already
    written), then resumed from 'latest' with a differently initialised model: every step is logged once, and
    each logged number equals the uninterrupted run's exactly."""
    cfg = config(tmp_path)
    real_make_train_step = sft.make_train_step

    def make_killable_train_step(*args, **kwargs):
        step_fn, calls = real_make_train_step(*args, **kwargs), []

        def killable(*step_args):
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt("simulated kill")
            return step_fn(*step_args)

        return killable

    monkeypatch.setattr(sft, "make_train_step", make_killable_train_step)
    with pytest.raises(KeyboardInterrupt):
        sft.train(tiny_llama(VOCAB), TOKENIZER, DATASET, cfg)
    monkeypatch.setattr(sft, "make_train_step", real_make_train_step)
    assert saved_steps(tmp_path) == [3] and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

    sft.train(tiny_llama(VOCAB, seed=123), TOKENIZER, DATASET, cfg.replace(resume_from_checkpoint="latest"))
    expected, resumed = read_metrics(reference_run), read_metrics(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed == expected  # every key of every line, bitwise (loss, grad_norm, num_tokens, ...)
    assert saved_steps(tmp_path) == [3, 6]
