"""Checkpoints: orbax for the `TrainState` (sharded, multi-host) plus a small JSON of the data position;
Hugging Face format for the exported model. Never pickle.

Layout under `output_dir`:
    checkpoints/<step>/state        orbax PyTree checkpoint of the TrainState leaves
    checkpoints/<step>/progress     JSON: {"step": ..., "epoch": ..., ...}
    final/                          config.json + model.safetensors (+ tokenizer files)

Resuming restores the state into the shardings the caller asks for and returns the step to continue from;
the data order is a function of (seed, epoch) (`jaxpt.data.step_indices`), so a resumed run replays exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    def __init__(self, output_dir: str | Path, *, save_total_limit: int | None = None):
        self.directory = Path(output_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=save_total_limit, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, progress: dict) -> Path:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        progress=ocp.args.JsonSave({"step": step, **progress})))
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, state_like: Any, shardings: Any = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` into the structure of `state_like` (arrays or ShapeDtypeStructs), placed by
        `shardings` (a matching pytree of shardings) or like `state_like`'s arrays."""
        if shardings is None:
            shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), state_like)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like,
                                shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      progress=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["progress"])

    def close(self) -> None:
        self.manager.close()


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> tuple[Path, int] | None:
    """`(output_dir of the run, step)` to resume from: `'latest'` (or `'true'`) means the newest checkpoint in
    `output_dir` (None if there is none); a path names `.../checkpoints/<step>`."""
    if not resume_from_checkpoint:
        return None
    if str(resume_from_checkpoint).lower() in ("latest", "true"):
        step = Checkpointer(output_dir).latest_step()
        return None if step is None else (Path(output_dir), step)
    path = Path(resume_from_checkpoint).absolute()
    if not path.is_dir() or not path.name.isdigit() or path.parent.name != CHECKPOINT_DIR:
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint directory "
                         f"(expected <output_dir>/{CHECKPOINT_DIR}/<step>, or 'latest').")
    return path.parent.parent, int(path.name)
