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
from dataclasses import dataclass, field

LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")


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
    report_to: str = field(default="none", metadata={"help": "Extra metric sinks besides metrics.jsonl: 'none', "
                                                             "'tensorboard', 'wandb' (comma-separated)."})
    run_name: str | None = field(default=None, metadata={"help": "Run name for W&B / TensorBoard."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    save_final_model: bool = field(default=True, metadata={"help": "Export the final model to "
                                                                   "output_dir/final in Hugging Face format."})

    # Precision, memory, mesh
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 compute (None: on GPU/TPU yes, CPU no)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Rematerialise each decoder layer in "
                                                                          "the backward pass."})
    mesh_data: int = field(default=1, metadata={"help": "Mesh 'data' axis size (pure data parallelism)."})
    mesh_fsdp: int = field(default=-1, metadata={"help": "Mesh 'fsdp' axis size (-1: remaining devices)."})
    mesh_tensor: int = field(default=1, metadata={"help": "Mesh 'tensor' axis size (tensor parallelism)."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field, the value and the fix; subclasses extend it."""
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
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
        if self.overwrite_output_dir and str(self.resume_from_checkpoint).lower() in ("latest", "true"):
            raise ValueError(f"overwrite_output_dir=True deletes the checkpoints that resume_from_checkpoint="
                             f"{self.resume_from_checkpoint!r} would resume from: drop one of the two.")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
