"""Metric writers: `metrics.jsonl` always, plus console/progress bar, TensorBoard and W&B when asked.

`MetricsLogger.log(step, metrics)` takes one optimizer step's metrics (scalar arrays, left on device until a
logging boundary); every `logging_steps` steps it writes one JSON line with `step`, `epoch` and the window's
mean of each metric (`loss`, `grad_norm`, `learning_rate`, and the method's metrics under TRL's names).
`num_tokens` and other running totals are reported as their latest value, not averaged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import jax

from jaxpt.config import resolve_report_to

logger = logging.getLogger("jaxpt")

CUMULATIVE = ("num_tokens",)  # running totals: log the last value, not the window mean


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, logging_steps: int, total_steps: int,
                 report_to: str | list[str] | None = "none",
                 run_name: str | None = None, disable_tqdm: bool = False, description: str = "train",
                 start_step: int = 0, config: dict | None = None):
        self.output_dir = Path(output_dir)
        self.logging_steps = logging_steps
        self.is_main = jax.process_index() == 0
        self.path = self.output_dir / "metrics.jsonl"
        self.window: dict[str, list[float]] = defaultdict(list)
        self.pending: list[tuple[int, dict]] = []
        self.history: list[dict] = []
        self.started = time.perf_counter()
        self.progress = None
        self.sinks = []
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log; a resumed one appends
        if not disable_tqdm:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)
        for sink in resolve_report_to(report_to):  # unknown or missing trackers fail here (and in validate)
            if sink == "tensorboard":
                self.sinks.append(_TensorBoard(self.output_dir / "tensorboard"))
            else:
                self.sinks.append(_WandB(run_name, config or {}))

    def log(self, step: int, metrics: dict, *, epoch: float | None = None) -> dict | None:
        """Record the metrics of optimizer step `step` (1-based). They stay on device (no host sync, so the
        next step is dispatched while this one runs) until a logging boundary, where the window is fetched,
        checked for NaN/inf loss and written as one line."""
        self.pending.append((step, metrics))
        if self.progress is not None:
            self.progress.update(1)
        if step % self.logging_steps == 0:
            return self.flush(step, epoch=epoch)
        return None

    def sync(self) -> None:
        """Fetch pending metrics into the window; raise `NonFiniteLossError` at the first non-finite loss."""
        if not self.pending:
            return
        fetched = jax.device_get([metrics for _, metrics in self.pending])
        for (step, _), values in zip(self.pending, fetched, strict=True):
            loss = float(values.get("loss", 0.0))
            if not math.isfinite(loss):
                self.pending.clear()
                raise NonFiniteLossError(step, loss)
            for key, value in values.items():
                self.window[key].append(float(value))
        self.pending.clear()

    def flush(self, step: int, *, epoch: float | None = None) -> dict | None:
        self.sync()
        if not self.window:
            return None
        record = {"step": step}
        if epoch is not None:
            record["epoch"] = round(epoch, 4)
        for key, values in self.window.items():
            # NaN marks a metric undefined at that step (e.g. no rejected example in a KTO batch): average the
            # steps where it is defined, as TRL does; a window where it never is logs no such key.
            values = [v for v in values if not math.isnan(v)]
            if values:
                record[key] = values[-1] if key.split("/")[-1] in CUMULATIVE else sum(values) / len(values)
        self.window.clear()
        if self.progress is not None and "loss" in record:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        return self.write(record)

    def write(self, record: dict) -> dict:
        """Write one record (training window or evaluation) to every sink."""
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(record)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(record)
            if self.progress is not None:
                self.progress.write(_format(record))
            else:
                logger.info(_format(record))
        return record

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()


class NonFiniteLossError(FloatingPointError):
    """Training stopped: the loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        self.step = step
        self.loss = loss
        super().__init__(f"The loss is {loss} at step {step}; training stopped. Checkpoints written before this "
                         "step hold finite parameters: lower the learning rate, check the data, or resume from one.")


CONSOLE_KEYS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "reward", "kl", "mean_token_accuracy",
                "rewards/margins", "rewards/accuracies", "accuracy")


def _format(record: dict) -> str:
    """One console line: the main metrics and any evaluation ones (metrics.jsonl has them all)."""
    parts = []
    for key, value in record.items():
        if key in CONSOLE_KEYS or key.startswith("eval_"):
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class _TensorBoard:
    def __init__(self, directory: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as error:
            raise ValueError('report_to=tensorboard needs tensorboardX: pip install -e ".[tracking]".') from error
        self.writer = SummaryWriter(str(directory))

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_name: str | None, config: dict):
        try:
            import wandb
        except ImportError as error:
            raise ValueError('report_to=wandb needs wandb: pip install -e ".[tracking]".') from error
        self.run = wandb.init(name=run_name, config=config)

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()
