"""`jaxpt demo`, the README's first command: SFT on noisy arithmetic, then GRPO raises held-out accuracy."""

import json

from PIL import Image

from jaxpt import cli, demo


def test_demo_raises_heldout_accuracy_and_writes_its_outputs(tmp_path):
    assert cli.main(["demo", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["accuracy_after_grpo"] >= summary["accuracy_before_grpo"] + 0.15
    assert summary["seconds"] < 300
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert Image.open(summary["reward_plot"]).size[0] > 100


def test_heldout_problems_are_unseen_and_demonstrations_are_noisy():
    train, heldout = demo.arithmetic_split(0)
    assert len(heldout) == demo.HELD_OUT and not set(train) & set(heldout)
    rows = demo.noisy_demonstrations(train, 0)
    off_by_one = sum(r["completion"] != str(eval(r["prompt"][:-1])) for r in rows) / len(rows)
    assert abs(off_by_one - demo.OFF_BY_ONE) < 0.08
