"""Checkpoints: orbax for the `TrainState` (sharded, multi-host) plus a small JSON of the data position and the
run's fingerprint; Hugging Face format for the exported model. Never pickle.

Layout under `output_dir`:
    checkpoints/<step>/state        orbax PyTree checkpoint of the TrainState leaves (under LoRA the adapters and
                                    their optimizer state only: the frozen base is the model the run starts from)
    checkpoints/<step>/progress     JSON: {"step": ..., "num_tokens": ..., "fingerprint": {...}}
    checkpoints/<step>/extra        optional orbax PyTree of arrays outside the TrainState that the run moves and
                                    needs to continue exactly (e.g. the TR-DPO reference: `{"reference": ...}`)
    final/                          config.json + model.safetensors (+ tokenizer files)

Resuming restores the state into the shardings the caller asks for and returns the step to continue from;
the data order is a function of (seed, epoch) (`jaxpt.data.step_indices`), so a resumed run replays exactly
the batches the uninterrupted run would have seen.

The fingerprint (`run_fingerprint`) records what must not change between a run and its resumption: the method,
the model's shape-fixing configuration, the optimizer's structure and every parameter's shape. A checkpoint whose
fingerprint differs from the resuming run's is refused with the differing field named, instead of being
restored into (or failing deep inside) the wrong run. A checkpoint that cannot be read raises
`DamagedCheckpointError` (a `ValueError`), which `jaxpt.loop.resume` turns into a fallback or a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger("jaxpt")

CHECKPOINT_DIR = "checkpoints"

# Configuration fields of a model that fix its parameters' shapes (read from `model.config` when present).
MODEL_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
# Training fields that do not change the state but fix which batches follow the checkpoint's step: a resumed
# run that changes them is allowed (as in transformers) but no longer replays the interrupted run; we warn.
DATA_ORDER_FIELDS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")
# Why a fingerprint field matters, for fields whose name alone does not say it.
FIELD_NOTES = {"gradient_clipping": "max_grad_norm > 0 adds a clipping stage to the optimizer state"}


class DamagedCheckpointError(ValueError):
    """A checkpoint directory that cannot be restored (missing parts, unreadable JSON, truncated arrays)."""

    def __init__(self, directory: Path, reason: str):
        self.directory = directory
        self.reason = reason
        super().__init__(f"Checkpoint {directory} is damaged: {reason}.")


def run_fingerprint(config, *, method: str, model: Any) -> dict:
    """What identifies a run's checkpoints: `method` (e.g. "sft"), the model's shape-fixing config fields and
    `num_labels`, whether the optimizer clips gradients (it changes the optimizer-state tree), and the fields of
    the data order. Learning rate, schedule, logging and the like may change on resume and are not recorded."""
    model_config = getattr(model, "config", None)
    fingerprint = {"method": method}
    for name in MODEL_SHAPE_FIELDS:
        if hasattr(model_config, name):
            fingerprint[name] = getattr(model_config, name)
    fingerprint["num_labels"] = getattr(model, "num_labels", None)
    fingerprint["gradient_clipping"] = bool(config.max_grad_norm and config.max_grad_norm > 0)
    fingerprint["data_order"] = {name: getattr(config, name) for name in DATA_ORDER_FIELDS}
    return json.loads(json.dumps(fingerprint))  # the values exactly as they read back from a checkpoint


def parameter_shapes(state: Any) -> dict[str, str]:
    """`{path: "float32[2, 32, 64]"}` of the state's parameters (of every leaf if it has no `params`)."""
    tree = getattr(state, "params", state)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in leaves}


class Checkpointer:
    """Orbax checkpoints of a run under `output_dir/checkpoints/<step>`.

    `save_total_limit`: keep at most this many (None or <= 0 keeps all, as transformers). `fingerprint`: the
    run's `run_fingerprint`, written into every checkpoint and checked by `restore`."""

    def __init__(self, output_dir: str | Path, *, save_total_limit: int | None = None,
                 fingerprint: dict | None = None):
        self.directory = Path(output_dir).absolute() / CHECKPOINT_DIR
        self.fingerprint = fingerprint
        max_to_keep = save_total_limit if save_total_limit is not None and save_total_limit > 0 else None
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def step_directory(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, progress: dict, *, extra: dict | None = None) -> Path:
        """Write checkpoint `step` (with `extra`, a dict of array pytrees outside the state, when given); raise
        `RuntimeError` if it was not written (orbax skips, without an error, any step not above the newest
        checkpoint in the directory)."""
        record = {"step": step, **progress}
        if self.fingerprint is not None:
            record["fingerprint"] = {**self.fingerprint, "parameters": parameter_shapes(state)}
        if getattr(state, "frozen", None) is not None:  # LoRA: the frozen base is the model the run starts from
            state = state.replace(frozen=None)
        items = {"state": ocp.args.StandardSave(state), "progress": ocp.args.JsonSave(record)}
        if extra is not None:
            items["extra"] = ocp.args.StandardSave(extra)
        saved = self.manager.save(step, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()
        path = self.step_directory(step)
        if not saved:
            raise RuntimeError(f"Checkpoint {path} was not written: orbax writes only steps above the newest "
                               f"checkpoint in {self.directory} (step {self.latest_step()}). Another run's "
                               "checkpoints are in this output_dir: move them away or use a fresh output_dir.")
        if jax.process_index() == 0 and not path.is_dir():
            raise RuntimeError(f"Checkpoint {path} was not written: the directory does not exist after saving.")
        return path

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reload(self) -> None:
        """Re-read the directory (after checkpoints were moved by hand or by another process)."""
        self.manager.reload()

    def read_progress(self, step: int) -> dict:
        """The progress JSON of checkpoint `step`; `DamagedCheckpointError` if it or `state/` is missing or
        unreadable."""
        path = self.step_directory(step)
        if not (path / "state").is_dir():
            raise DamagedCheckpointError(path, "it has no state/ directory")
        try:
            progress = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
            progress = progress["progress"]
        except Exception as error:  # orbax reports a missing item as KeyError, an empty file as JSONDecodeError
            raise DamagedCheckpointError(path, f"its progress JSON is missing or unreadable "
                                               f"({type(error).__name__}: {_first_line(error)})") from error
        if not isinstance(progress, dict) or progress.get("step") != step:
            raise DamagedCheckpointError(path, f"its progress JSON is {progress!r}, not the record of step {step}")
        return dict(progress)

    def restore(self, step: int, state_like: Any, shardings: Any = None, *,
                extra_like: dict | None = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` into the structure of `state_like` (arrays or ShapeDtypeStructs), placed by
        `shardings` (a matching pytree of shardings) or like `state_like`'s arrays. Returns `(state, progress)`.
        With `extra_like` (arrays, as given to `save(extra=)`), `progress["extra"]` holds the saved extra arrays,
        placed like `extra_like`'s, or is None when the checkpoint has none (written without them).

        Raises `ValueError` naming the field when the checkpoint's fingerprint differs from this run's, and
        `DamagedCheckpointError` when the checkpoint cannot be read."""
        path = self.step_directory(step)
        progress = self.read_progress(step)
        saved = progress.pop("fingerprint", None)
        if saved is None:
            logger.warning("Checkpoint %s has no run fingerprint (written by an older jaxpt): cannot check that it "
                           "belongs to this run's method and model.", path)
        else:
            current = {**(self.fingerprint or {}), "parameters": parameter_shapes(state_like)}
            check_fingerprint(saved, current, path)
        frozen = getattr(state_like, "frozen", None)
        if frozen is not None:  # LoRA: only the adapters and their optimizer state were saved (`save`)
            state_like = state_like.replace(frozen=None)
            shardings = None if shardings is None else shardings.replace(frozen=None)
        if shardings is None:
            shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), state_like)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like,
                                shardings)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if extra_like is not None and (path / "extra").is_dir():
            items["extra"] = ocp.args.StandardRestore(jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), extra_like))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # TensorStore raises a bare Exception for a truncated or missing array file
            raise DamagedCheckpointError(path, f"its arrays cannot be read ({type(error).__name__}: "
                                               f"{_first_line(error)})") from error
        restored_state = restored["state"]
        if extra_like is not None:
            progress["extra"] = restored["extra"] if "extra" in items else None
        return (restored_state if frozen is None else restored_state.replace(frozen=frozen)), progress

    def close(self) -> None:
        self.manager.close()


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    """Raise `ValueError` at the first field where checkpoint `path`'s fingerprint differs from this run's;
    warn when only the data order changes."""
    for name, value in current.items():
        if name in ("data_order", "parameters") or name not in saved:
            continue
        if saved[name] != value:
            note = f" ({FIELD_NOTES[name]})" if name in FIELD_NOTES else ""
            raise ValueError(f"Checkpoint {path} belongs to another run: {name}{note} is {saved[name]!r} there and "
                             f"{value!r} in this run. Resume it with the method, model and optimizer settings that "
                             "wrote it, or start a fresh run (another output_dir, or overwrite_output_dir=True).")
    saved_shapes, shapes = saved.get("parameters"), current.get("parameters")
    if saved_shapes is not None and shapes is not None and saved_shapes != shapes:
        name = next(n for n in sorted(set(saved_shapes) | set(shapes)) if saved_shapes.get(n) != shapes.get(n))
        raise ValueError(f"Checkpoint {path} belongs to another model: parameter {name} is "
                         f"{saved_shapes.get(name, 'absent')} there and {shapes.get(name, 'absent')} in this run. "
                         "Resume it with the model that wrote it, or start a fresh run.")
    for name, value in current.get("data_order", {}).items():
        before = saved.get("data_order", {}).get(name, value)
        if before != value:
            logger.warning("Resuming %s with %s=%r (the checkpointed run had %r): the resumed run does not replay "
                           "the batches the interrupted run would have seen.", path, name, value, before)


def existing_checkpoints(output_dir: str | Path) -> list[Path]:
    """The step directories (complete, damaged or half-written) under `output_dir/checkpoints`."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.split(".")[0].isdigit())


def parse_checkpoint_path(path: str | Path) -> tuple[Path, int]:
    """`(output_dir of the run, step)` of an explicit checkpoint path `.../checkpoints/<step>`."""
    resolved = Path(path).absolute()
    if not resolved.exists():
        raise ValueError(f"resume_from_checkpoint={str(path)!r} does not exist: give an existing "
                         f"<output_dir>/{CHECKPOINT_DIR}/<step> directory, or 'latest' for the newest in output_dir.")
    if not resolved.is_dir() or not resolved.name.isdigit() or resolved.parent.name != CHECKPOINT_DIR:
        raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint directory (expected "
                         f"<output_dir>/{CHECKPOINT_DIR}/<step>, or 'latest').")
    return resolved.parent.parent, int(resolved.name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
