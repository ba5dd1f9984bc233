"""`jaxpt demo`, the README's first command: SFT on noisy arithmetic, then GRPO raises held-out accuracy."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from jaxpt import demo
from tests.conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parent.parent


# `python -m jaxpt.cli` in a process where `import matplotlib` fails, as on an install without the `demo` extra.
WITHOUT_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = sys.modules['matplotlib.pyplot'] = None; "
                      "from jaxpt.cli import main; sys.exit(main())")


def run_demo(output_dir, *options, matplotlib=True) -> tuple[dict, subprocess.CompletedProcess]:
    """`jaxpt demo` as the README runs it: a fresh process, one CPU device, XLA's default optimisation (the suite's
    compile-fast `TEST_XLA_FLAGS` make hundreds of training steps ~3x slower); returns its summary and the finished
    process (its stdout and stderr)."""
    flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").split()
    env = {**os.environ, "XLA_FLAGS": " ".join(f for f in flags if "host_platform_device_count" not in f)}
    python = ["-m", "jaxpt.cli"] if matplotlib else ["-c", WITHOUT_MATPLOTLIB]
    done = subprocess.run([sys.executable, *python, "demo", "--output_dir", str(output_dir), *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((Path(output_dir) / "demo_summary.json").read_text()), done


def test_demo_raises_heldout_accuracy_and_writes_its_outputs(tmp_path):
    summary, _ = run_demo(tmp_path)
    assert summary["accuracy_after_grpo"] >= summary["accuracy_before_grpo"] + 0.15
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert Image.open(summary["reward_plot"]).size[0] > 100


def test_demo_with_lora_adapters_and_without_matplotlib(tmp_path):
    """`jaxpt demo --use_peft`: GRPO trains only LoRA adapters on the frozen SFT model, sampling with the adapters
    applied (no merge), and still raises the demo task's reward and held-out accuracy; the adapter is written in
    peft's format beside the merged checkpoint. The run is one without matplotlib (the `demo` extra): it warns once
    (before the training: test_demo_warning_precedes_the_training), says there is no plot, and writes the summary
    it prints; only the plot is missing. (One full run for both: the plot itself is test_demo_raises_...'s.)"""
    summary, done = run_demo(tmp_path, "--use_peft", "--grpo_steps", "200", matplotlib=False)
    assert summary["use_peft"] is True
    assert summary["accuracy_after_grpo"] >= summary["accuracy_before_grpo"] + 0.15
    rewards = [json.loads(line)["reward"] for line in Path(summary["grpo_metrics"]).read_text().splitlines()]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    adapter_config = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert adapter_config["r"] == demo.DEMO_LORA["lora_r"] and adapter_config["peft_type"] == "LORA"
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(summary["model_dir"])

    warned = [line for line in done.stderr.splitlines() if "matplotlib is not installed" in line]
    assert len(warned) == 1 and 'pip install -e ".[demo]"' in warned[0], done.stderr[-3000:]
    assert "no reward plot: matplotlib is missing" in done.stdout
    printed = json.loads(done.stdout[done.stdout.rindex("\n{") + 1:])  # the summary, printed last
    assert printed == summary
    assert summary["reward_plot"] is None and not (tmp_path / "grpo_reward.png").exists()
    assert summary["heldout_problems"] == demo.HELD_OUT
    sft_steps = [json.loads(line)["step"] for line in Path(summary["sft_metrics"]).read_text().splitlines()]
    assert sft_steps == list(range(100, 701, 100))  # logging_steps=100 of the default 700


def test_heldout_problems_are_unseen_and_demonstrations_are_noisy():
    train, heldout = demo.arithmetic_split(0)
    assert len(heldout) == demo.HELD_OUT and not set(train) & set(heldout)
    rows = demo.noisy_demonstrations(train, 0)
    off_by_one = sum(r["completion"] != str(eval(r["prompt"][:-1])) for r in rows) / len(rows)
    assert abs(off_by_one - demo.OFF_BY_ONE) < 0.08


@pytest.fixture
def without_matplotlib(monkeypatch):
    """`import matplotlib` fails as on an install without the `demo` extra."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_demo_warning_precedes_the_training(tmp_path, without_matplotlib, monkeypatch):
    """The user learns about the missing plot before the minute of training, not after it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def stop_before_training(*args, **kwargs):
            raise RuntimeError(f"stopped after: {[str(w.message) for w in caught]}")

        monkeypatch.setattr(demo, "char_tokenizer", stop_before_training)  # the first step of the work
        with pytest.raises(RuntimeError, match=r'stopped after: .*matplotlib is not installed.*\.\[demo\]'):
            demo.run(str(tmp_path))


def test_summary_is_written_before_the_plot(tmp_path, monkeypatch):
    """A plot that fails (or a matplotlib that breaks) cannot take the summary with it."""
    def failing_plot(records, path):
        assert json.loads((tmp_path / "demo_summary.json").read_text()) == {"accuracy_after_grpo": 0.5}
        raise RuntimeError("plot failed")

    monkeypatch.setattr(demo, "plot_rewards", failing_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        demo.write_summary_and_plot(tmp_path, {"accuracy_after_grpo": 0.5}, [{"step": 1, "reward": 0.5}],
                                    plot_path=tmp_path / "plot.png")
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == {"accuracy_after_grpo": 0.5}


def test_plot_without_matplotlib_names_the_extra(tmp_path, without_matplotlib):
    assert demo.matplotlib_missing()
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[demo]"')):
        demo.plot_rewards([{"step": 1, "reward": 0.5}], tmp_path / "plot.png")
