"""Small pieces every method's `train()` loop uses: resume, evaluation cadence, new-shape notes, export.

Each method writes its own loop (see `jaxpt/sft.py: train`); these helpers only keep the mechanical parts
identical across methods.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax

from jaxpt.checkpoint import Checkpointer, resolve_resume

logger = logging.getLogger("jaxpt")


@dataclasses.dataclass
class TrainResult:
    """What a method's `train()` returns."""

    state: Any  # the final TrainState (`state.model()` is the trained model)
    metrics: list[dict]  # every record written to metrics.jsonl
    model_dir: str | None  # the exported Hugging Face model, if saved


def resume(config, state, state_sharding, checkpoints: Checkpointer) -> tuple[object, int, dict]:
    """`(state, start_step, progress)`: the restored checkpoint named by `config.resume_from_checkpoint`
    (`'latest'` or a path), or the fresh state at step 0."""
    target = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if target is None:
        if config.resume_from_checkpoint and str(config.resume_from_checkpoint).lower() not in ("latest", "true"):
            raise ValueError(f"resume_from_checkpoint={config.resume_from_checkpoint!r}: nothing to resume.")
        if config.resume_from_checkpoint:
            logger.warning("resume_from_checkpoint=%r: no checkpoint in %s/checkpoints, so training starts from "
                           "step 0.", config.resume_from_checkpoint, config.output_dir)
        return state, 0, {}
    run_dir, step = target
    source = checkpoints if Path(run_dir).absolute() == checkpoints.directory.parent else Checkpointer(run_dir)
    state, progress = source.restore(step, state, state_sharding)
    logger.info("Resumed from %s/checkpoints/%d", run_dir, step)
    return state, step, progress


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
    """Write the trained model (and tokenizer) to `output_dir/final` in Hugging Face format."""
    if not config.save_final_model:
        return None
    from jaxpt.models import save_pretrained

    directory = Path(config.output_dir) / "final"
    save_pretrained(state.model(), directory)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
    return str(directory)
