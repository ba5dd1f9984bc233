"""`TrainingConfig`: the fields every method's config shares, with TRL's (transformers' `TrainingArguments`)
names and defaults, so `--per_device_train_batch_size 8 --gradient_accumulation_steps 4 ...` means what a TRL
user expects. Each method's config (`SFTConfig`, `DPOConfig`, ...) subclasses it and adds its own fields.

Where jaxpt differs from TRL on purpose:
- `bf16=None` picks bfloat16 compute on GPU/TPU and float32 on CPU (TRL: bfloat16 unless fp16);
  master weights are always float32.
- `gradient_checkpointing` defaults to False (TRL: True): XLA already frees what it can, and rematerialising
  every layer costs ~30% speed; turn it on for long sequences or big models.
- `mesh_data` / `mesh_fsdp` / `mesh_tensor` shape the device mesh (one axis may be -1: all remaining devices).
  `per_device_train_batch_size` is per data-parallel shard: a step's global batch is
  `per_device_train_batch_size * mesh_data * mesh_fsdp * gradient_accumulation_steps` (the same arithmetic as
  TRL's `per_device * processes * accumulation`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from jaxpt.distributed import check_process_fields

LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")
# report_to name -> the module it needs (installed by `pip install -e ".[tracking]"`)
TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}


@dataclass
class TrainingConfig:
    output_dir: str = field(default="runs/jaxpt", metadata={"help": "Where metrics.jsonl, checkpoints and the "
                                                                    "final Hugging Face model are written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an output_dir that holds "
                                                                        "an earlier run: delete what jaxpt wrote "
                                                                        "there (checkpoints/, metrics.jsonl, "
                                                                        "completions.jsonl, final/, tensorboard/) "
                                                                        "first. Without it, a fresh run into a "
                                                                        "directory with checkpoints is refused."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and sampling."})

    # Batch and schedule
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per data-parallel shard per "
                                                                          "micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples per data-parallel shard for "
                                                                         "evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step "
                                                                          "(accumulated inside the jitted step)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training set (ignored when "
                                                                   "max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs when > 0."})

    # Optimizer (AdamW) and learning-rate schedule
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"One of {LR_SCHEDULER_TYPES}."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of steps for linear warm-up."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps (overrides warmup_ratio when > 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and "
                                                                "norm weights, as in transformers' Trainer)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0 disables)."})
    min_lr_rate: float = field(default=0.0, metadata={"help": "cosine_with_min_lr: final lr as a fraction of the "
                                                             "peak."})

    # Logging, evaluation, checkpoints
    logging_steps: int = field(default=10, metadata={"help": "Optimizer steps per metrics.jsonl line (metrics are "
                                                             "averaged over the window)."})
    eval_strategy: str = field(default="no", metadata={"help": "'no', 'steps' (every eval_steps) or 'epoch'."})
    eval_steps: int | None = field(default=None, metadata={"help": "Steps between evaluations (default: "
                                                                   "logging_steps)."})
    save_steps: int = field(default=500, metadata={"help": "Steps between orbax checkpoints (0 disables)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints "
                                                                         "(None or <= 0: keep all, as "
                                                                         "transformers)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint directory, or 'latest' "
                                                                               "for the newest in output_dir."})
    report_to: list[str] | str = field(default_factory=lambda: ["none"], metadata={
        "help": "Extra metric sinks besides metrics.jsonl: 'none', 'all' (every installed one), or any of "
                f"{sorted(TRACKERS)} (`--report_to tensorboard wandb`; in Python a list or a comma-separated "
                "string). They need `pip install -e \".[tracking]\"`."})
    run_name: str | None = field(default=None, metadata={"help": "Run name for W&B / TensorBoard."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    save_final_model: bool = field(default=True, metadata={"help": "Export the final model to "
                                                                   "output_dir/final in Hugging Face format."})
    merge_adapter_on_save: bool = field(default=False, metadata={
        "help": "With LoRA (--use_peft), also export the model with the adapters merged into its weights "
                "(W + scale * B A) as a full Hugging Face checkpoint in output_dir/final_merged; final/ keeps the "
                "adapter."})

    # Precision, memory, mesh
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 compute (None: on GPU/TPU yes, CPU no)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Rematerialise each decoder layer in "
                                                                          "the backward pass."})
    mesh_data: int = field(default=1, metadata={"help": "Mesh 'data' axis size (pure data parallelism)."})
    mesh_fsdp: int = field(default=-1, metadata={"help": "Mesh 'fsdp' axis size (-1: remaining devices)."})
    mesh_tensor: int = field(default=1, metadata={"help": "Mesh 'tensor' axis size (tensor parallelism)."})

    # Several processes (hosts): jaxpt.distributed; unset = the environment's JAX_* variables, else one process
    coordinator_address: str | None = field(default=None, metadata={
        "help": "HOST:PORT of process 0's coordinator (the same on every process), or 'auto' to let "
                "jax.distributed.initialize() detect the cluster (TPU pods, SLURM, Open MPI). Default: "
                "$JAX_COORDINATOR_ADDRESS, else a single-process run."})
    num_processes: int | None = field(default=None, metadata={"help": "Processes in the run (one per host; "
                                                                      "default $JAX_NUM_PROCESSES)."})
    process_id: int | None = field(default=None, metadata={"help": "This process's index, 0 .. num_processes-1 "
                                                                   "(default $JAX_PROCESS_ID)."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field, the value and the fix; subclasses extend it. `train()` calls it
        again, so a field changed after construction is checked too."""
        if self.report_to is None:  # transformers' "no trackers"
            self.report_to = []
        check_field_types(self)
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps={self.eval_steps} must be >= 1 (or None: every logging_steps).")
        for name in ("max_grad_norm", "weight_decay", "warmup_steps", "adam_epsilon", "min_lr_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0"
                                 + (" (0 disables gradient clipping)." if name == "max_grad_norm" else "."))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: pass the directory metrics, checkpoints and the model go to.")
        self.report_to = resolve_report_to(self.report_to)
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r} is not supported; use one of "
                             f"{LR_SCHEDULER_TYPES}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be >= 0.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set max_steps > 0 or num_train_epochs > 0: there is nothing to train.")
        if self.eval_strategy not in ("no", "steps", "epoch"):
            raise ValueError(f"eval_strategy={self.eval_strategy!r}; use 'no', 'steps' or 'epoch'.")
        if self.save_steps < 0:
            raise ValueError(f"save_steps={self.save_steps} must be >= 0 (0 disables checkpoints).")
        check_process_fields(self.coordinator_address, self.num_processes, self.process_id)
        if self.overwrite_output_dir and str(self.resume_from_checkpoint).lower() in ("latest", "true"):
            raise ValueError(f"overwrite_output_dir=True deletes the checkpoints that resume_from_checkpoint="
                             f"{self.resume_from_checkpoint!r} would resume from: drop one of the two.")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_report_to(report_to: str | list[str] | None) -> list[str]:
    """The trackers `report_to` names, as a list: HF's list form (`["wandb", "tensorboard"]`), a comma-separated
    string, `"none"` (none) or `"all"` (every installed tracker, as transformers does). Unknown names and
    trackers that are not installed raise `ValueError`."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"report_to={report_to!r}: each entry must be a string ('none', 'all', "
                             f"{', '.join(repr(t) for t in sorted(TRACKERS))}).")
        names += [name.strip() for name in item.replace(",", " ").split() if name.strip()]
    if names == ["all"]:
        return [name for name in sorted(TRACKERS) if tracker_installed(name)]
    if names in ([], ["none"]):
        return []
    valid = ["all", "none", *sorted(TRACKERS)]
    for name in names:
        if name not in TRACKERS:
            reason = "'none' and 'all' stand alone" if name in ("none", "all") else f"unknown tracker {name!r}"
            raise ValueError(f"report_to={report_to!r}: {reason}; use one of {valid} (several trackers: "
                             "--report_to tensorboard wandb).")
        if not tracker_installed(name):
            raise ValueError(f"report_to={report_to!r}: {name} needs the {TRACKERS[name]!r} package, which is not "
                             'installed: pip install -e ".[tracking]" (or pip install '
                             f"{TRACKERS[name]}), or drop {name!r} from report_to.")
    return list(dict.fromkeys(names))


def tracker_installed(name: str) -> bool:
    """Whether the package tracker `name` (a key of `TRACKERS`) writes with is importable."""
    return importlib.util.find_spec(TRACKERS[name]) is not None


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Fail before any work unless `output_dir` is a directory this process can write, or can be created: not a
    file, not under a file, not in a read-only place. Creates nothing. Returns the path."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir={str(output_dir)!r} is a file, not a directory: pass a directory "
                                 "(it is created if missing) or move the file away.")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output_dir={str(output_dir)!r} cannot be created: {existing} is a file. Pass a "
                                 "directory path that is not inside a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path.absolute() else f" (its nearest existing parent {existing} is read-only)"
        raise ValueError(f"output_dir={str(output_dir)!r} is not writable{where}: pass a directory you can write "
                         "to, or fix its permissions.")
    return path


@functools.cache
def _field_types(config_class: type) -> dict[str, tuple]:
    """`{field: (accepted types, element types of a list or None)}` from the resolved annotations."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved (a user's subclass): no type checks
        return {}
    out = {}
    for f in dataclasses.fields(config_class):
        hint = hints.get(f.name)
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is \
            typing.Union else (hint,)
        accepted, elements = [], None
        for option in options:
            if option is type(None):
                accepted.append(type(None))
            elif option is bool:
                accepted.append(bool)
            elif option is int:
                accepted.append(numbers.Integral)
            elif option is float:
                accepted.append(numbers.Real)
            elif option is str:
                accepted += [str, os.PathLike]  # paths are strings to HF's parser; Path objects are fine
            elif typing.get_origin(option) is list:
                accepted += [list, tuple]
                elements = typing.get_args(option)
            else:
                accepted = None  # a type this check does not know: leave it alone
                break
        if accepted:
            out[f.name] = (tuple(accepted), elements)
    return out


def _type_names(accepted: tuple, elements: tuple | None) -> str:
    of = f" of {', '.join(t.__name__ for t in elements)}" if elements else ""
    names = {type(None): "None", bool: "a bool", numbers.Integral: "an int", numbers.Real: "a number",
             str: "a string", list: f"a list{of}"}
    return " or ".join(names[t] for t in accepted if t in names)


def check_field_types(config) -> None:
    """`ValueError` naming the field when a value has the wrong type (a string for a number, 1.5 for an int,
    1 for a bool ...), before any comparison fails with a raw `TypeError`."""
    for name, (accepted, elements) in _field_types(type(config)).items():
        value = getattr(config, name)
        is_bool = isinstance(value, bool)
        ok = isinstance(value, accepted) and not (is_bool and bool not in accepted)
        if ok and isinstance(value, (list, tuple)) and elements:
            element_types = tuple({int: numbers.Integral, float: numbers.Real}.get(t, t) for t in elements)
            ok = all(isinstance(v, element_types) and not isinstance(v, bool) for v in value)
        if not ok:
            raise ValueError(f"{name}={value!r} ({type(value).__name__}) must be {_type_names(accepted, elements)}.")
