"""Small pieces every method's `train()` loop uses: output_dir set-up, checkpoints and resume, evaluation cadence,
new-shape notes, export.

Each method writes its own loop (see `jaxpt/sft.py: train`); these helpers only keep the mechanical parts
identical across methods.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from jaxpt.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    DamagedCheckpointError,
    existing_checkpoints,
    parse_checkpoint_path,
    run_fingerprint,
)
from jaxpt.config import check_output_dir
from jaxpt.distributed import initialize_from_config

logger = logging.getLogger("jaxpt")


@dataclasses.dataclass
class TrainResult:
    """What a method's `train()` returns."""

    state: Any  # the final TrainState (`state.model()` is the trained model)
    metrics: list[dict]  # every record written to metrics.jsonl
    model_dir: str | None  # the exported Hugging Face model, if saved


# What jaxpt writes into output_dir: all that `overwrite_output_dir` removes (never a file it does not know).
RUN_OUTPUTS = (CHECKPOINT_DIR, "metrics.jsonl", "completions.jsonl", "final", "tensorboard")
DAMAGED_DIR = "damaged_checkpoints"


def prepare_output_dir(config) -> None:
    """Before any work: refuse a fresh run into an `output_dir` that holds another run's checkpoints (it would mix
    with them), or, with `overwrite_output_dir`, clear what jaxpt wrote there. Also checks that `output_dir` can be
    written (`config.check_output_dir`). The CLI calls it before loading the model; every `train()` calls it.
    First of all, it joins the multi-process run the config (or the environment) names (`jaxpt.distributed`)."""
    initialize_from_config(config)  # before anything touches JAX
    check_output_dir(config.output_dir)
    output_dir = Path(config.output_dir)
    if config.overwrite_output_dir:
        resume_from = config.resume_from_checkpoint
        if resume_from and Path(str(resume_from)).absolute().is_relative_to((output_dir / CHECKPOINT_DIR).absolute()):
            raise ValueError(f"overwrite_output_dir=True would delete resume_from_checkpoint={resume_from!r}: drop "
                             "one of them.")
        if jax.process_index() == 0:
            for name in RUN_OUTPUTS:
                path = output_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        _sync_processes("jaxpt_overwrite_output_dir")
        return
    existing = existing_checkpoints(output_dir)
    if existing and not config.resume_from_checkpoint:
        names = ", ".join(p.name for p in existing)
        raise ValueError(f"output_dir={config.output_dir!r} already holds checkpoints ({names}) of an earlier run: a "
                         "fresh run would mix with them. Continue that run with resume_from_checkpoint='latest' "
                         "(--resume_from_checkpoint latest), start over with overwrite_output_dir=True "
                         "(--overwrite_output_dir, which deletes its checkpoints and metrics), or choose another "
                         "output_dir.")


def checkpointer(config, *, method: str, model) -> Checkpointer:
    """The run's `Checkpointer`: every checkpoint records `method`, the model's shapes and the optimizer's
    structure, and a resume that does not match them is refused."""
    return Checkpointer(config.output_dir, save_total_limit=config.save_total_limit,
                        fingerprint=run_fingerprint(config, method=method, model=model))


def resume(config, state, state_sharding, checkpoints: Checkpointer, *,
           extra: dict | None = None) -> tuple[object, int, dict]:
    """`(state, start_step, progress)`: the restored checkpoint named by `config.resume_from_checkpoint`
    (`'latest'` or a path), or the fresh state at step 0. With `extra` (the run's arrays outside the state, as
    given to `Checkpointer.save(extra=)`), a restored `progress["extra"]` holds their saved values (None when the
    checkpoint has none). `'latest'` skips damaged checkpoints (with a warning,
    moving them to `output_dir/damaged_checkpoints`); a damaged explicit one is an error. After a resume,
    `metrics.jsonl` (and `completions.jsonl`) are cut back to the restored step, so replayed steps are logged
    once."""
    request = config.resume_from_checkpoint
    if not request:
        return state, 0, {}
    if str(request).lower() in ("latest", "true"):
        restored = _restore_latest(config, state, state_sharding, checkpoints, extra)
        if restored is None:
            return state, 0, {}
        state, step, progress = restored
        run_dir = Path(config.output_dir)
    else:
        run_dir, step = parse_checkpoint_path(request)
        state, progress = _restore_path(run_dir, step, state, state_sharding, checkpoints, extra)
    truncate_logs(config.output_dir, step)
    logger.info("Resumed from %s/%s/%d", run_dir, CHECKPOINT_DIR, step)
    return state, step, progress


def planned_start_step(config) -> int:
    """The step `resume` is about to restore, known before anything is built (0 without one): the explicit
    checkpoint's step, or for `'latest'` the newest step directory. On several processes each prepares only the
    data of the steps still to run from it (`distributed.DataShare(start_step=)`); `check_planned_start` confirms
    it after `resume`."""
    request = config.resume_from_checkpoint
    if not request:
        return 0
    if str(request).lower() in ("latest", "true"):
        return max((int(p.name) for p in existing_checkpoints(config.output_dir) if p.name.isdigit()), default=0)
    return parse_checkpoint_path(request)[1]


def check_planned_start(share, start_step: int) -> None:
    """`ValueError` if `resume` restored an older step than the data share was prepared from (`planned_start_step`):
    the newest checkpoint was damaged, and `resume` has set it aside, so running the command again prepares the
    data of the right steps."""
    if not share.whole and start_step < share.first_step:
        raise ValueError(f"Resumed from step {start_step}, but this run prepared its share of the data for the steps "
                         f"after step {share.first_step}, the newest checkpoint, which was damaged (set aside in "
                         f"{DAMAGED_DIR}/): run the same command again to resume from step {start_step}.")


def _restore_latest(config, state, state_sharding, checkpoints: Checkpointer, extra=None):
    steps = checkpoints.all_steps()
    if not steps:
        logger.warning("resume_from_checkpoint=%r, but %s holds no checkpoint: training starts from scratch (step 0).",
                       config.resume_from_checkpoint, checkpoints.directory)
        return None
    damaged = []
    for step in reversed(steps):
        try:
            restored, progress = checkpoints.restore(step, state, state_sharding, extra_like=extra)
        except DamagedCheckpointError as error:
            logger.warning("%s Trying the next older checkpoint.", error)
            damaged.append(error.directory)
            continue
        _set_aside(damaged, Path(config.output_dir), checkpoints)
        return restored, step, progress
    raise ValueError(f"resume_from_checkpoint={config.resume_from_checkpoint!r}: every checkpoint in "
                     f"{checkpoints.directory} is damaged ({', '.join(str(p) for p in damaged)}; see the warnings "
                     "above). Move them away to start from scratch, or resume from a copy of the run.")


def _set_aside(damaged: list[Path], output_dir: Path, checkpoints: Checkpointer) -> None:
    """Move damaged checkpoints newer than the restored one out of the way (the resumed run saves those steps
    again, and orbax writes no step at or below an existing one); nothing is deleted."""
    if not damaged:
        return
    target = output_dir / DAMAGED_DIR
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for path in damaged:
            destination = target / path.name
            suffix = 1
            while destination.exists():
                destination, suffix = target / f"{path.name}.{suffix}", suffix + 1
            shutil.move(str(path), str(destination))
            logger.warning("Moved the damaged checkpoint %s to %s.", path, destination)
    _sync_processes("jaxpt_set_aside_damaged_checkpoints")
    checkpoints.reload()


def _restore_path(run_dir: Path, step: int, state, state_sharding, checkpoints: Checkpointer, extra=None):
    same_run = run_dir.absolute() == checkpoints.directory.parent
    # This run saves into checkpoints.directory: orbax would refuse (or mix in) steps beside existing ones.
    conflicting = [s for s in checkpoints.all_steps() if s > step or not same_run]
    if conflicting:
        where = "newer " if same_run else ""
        raise ValueError(f"Cannot resume from {run_dir / CHECKPOINT_DIR / str(step)}: this run's output_dir "
                         f"{checkpoints.directory.parent} holds {where}checkpoints {conflicting} that its own saves "
                         "would collide with. Move them away, or resume into another output_dir.")
    source = checkpoints if same_run else Checkpointer(run_dir, fingerprint=checkpoints.fingerprint)
    try:
        return source.restore(step, state, state_sharding, extra_like=extra)
    except DamagedCheckpointError as error:
        older = [s for s in source.all_steps() if s < step and _looks_complete(source, s)]
        hint = (f" The newest older checkpoint that looks complete is {source.step_directory(older[-1])}: resume "
                "from it." if older else " No older checkpoint of that run looks complete.")
        raise ValueError(f"resume_from_checkpoint={str(source.step_directory(step))!r}: {error}{hint}") from error
    finally:
        if source is not checkpoints:
            source.close()


def _looks_complete(checkpoints: Checkpointer, step: int) -> bool:
    try:
        checkpoints.read_progress(step)
    except DamagedCheckpointError:
        return False
    return True


def truncate_logs(output_dir: str | Path, step: int) -> None:
    """After resuming from `step`: keep the `metrics.jsonl` records of steps <= `step` (training and evaluation)
    and the `completions.jsonl` records of rollouts started before it, so the steps the resumed run replays are
    logged once. Process 0 only; a line cut short by the interruption is dropped."""
    if jax.process_index() != 0:
        return
    _filter_jsonl(Path(output_dir) / "metrics.jsonl", lambda record: record["step"] <= step)
    _filter_jsonl(Path(output_dir) / "completions.jsonl", lambda record: record["step"] < step)


def _filter_jsonl(path: Path, keep) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and keep(record):
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(kept))
    os.replace(partial, path)  # atomic: a second interruption leaves the old or the new file, never half of one


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def should_evaluate(config, step: int, steps_in_epoch: int) -> bool:
    if config.eval_strategy == "steps":
        return step % (config.eval_steps or config.logging_steps) == 0
    if config.eval_strategy == "epoch":
        return step % steps_in_epoch == 0
    return False


class ShapeNotes:
    """Logs the first time a step sees each batch shape (each new shape compiles the step once)."""

    def __init__(self, what: str = "train step"):
        self.seen: set = set()
        self.what = what

    def __call__(self, batch: dict) -> None:
        shape = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
        if shape not in self.seen:
            self.seen.add(shape)
            dims = {k: tuple(v.shape) for k, v in batch.items()}
            logger.info("Compiling the %s for batch shapes %s (%d shape(s) so far)", self.what, dims, len(self.seen))


def export(state, tokenizer, config) -> str | None:
    """Write the trained model (and tokenizer) to `output_dir/final` in Hugging Face format; a model with LoRA
    adapters as its adapter in peft's format (`adapter_config.json` + `adapter_model.safetensors`), and with
    `merge_adapter_on_save` also merged into a full checkpoint in `output_dir/final_merged`."""
    if not config.save_final_model:
        return None
    from flax import nnx

    from jaxpt.lora import has_adapters, merge_adapter, save_adapter
    from jaxpt.models import save_pretrained

    directory = Path(config.output_dir) / "final"
    model = state.model()
    written = [directory]
    if has_adapters(model):
        save_adapter(model, directory)
        if getattr(config, "merge_adapter_on_save", False):
            # a model of its own (new variables): merging in place leaves the train state's parameters as they are
            merged = merge_adapter(nnx.merge(state.graphdef, jax.tree.map(lambda x: x, state.full_params())))
            save_pretrained(merged, Path(config.output_dir) / "final_merged")
            written.append(Path(config.output_dir) / "final_merged")
    else:
        if getattr(config, "merge_adapter_on_save", False):
            logger.warning("merge_adapter_on_save: the model has no LoRA adapters; %s is its full checkpoint.",
                           directory)
        save_pretrained(model, directory)
    if tokenizer is not None and jax.process_index() == 0:
        for path in written:
            tokenizer.save_pretrained(path)
    return str(directory)
