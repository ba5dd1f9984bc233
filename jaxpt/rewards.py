"""Ready reward functions for GRPO / RLOO, with TRL's calling convention.

A reward function is any Python callable called with keywords,

    reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns) -> list[float | None]

returning one reward per completion (`None`: this function does not score that completion). Completions are
strings for standard data and `[{"role": "assistant", "content": ...}]` for conversational data. Extra dataset
columns (e.g. `solution`) arrive as lists aligned with the completions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of its last message."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{...}`, else the last number, else the stripped text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    text = text.strip()
    return text or None


def _same_answer(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(gold)) < 1e-9
    except ValueError:
        return predicted.strip() == gold.strip()


def accuracy_reward(completions: Sequence, solution: Sequence[str | None], **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (last `\\boxed{}` or last number) equals the `solution` column
    (numerically when both are numbers), else 0.0; `None` when the solution is missing. Exact matching, no
    symbolic math (TRL's `accuracy_reward` uses math_verify)."""
    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        if gold is None or str(gold).strip() == "":
            rewards.append(None)
            continue
        boxed = _BOXED.findall(str(gold))
        gold = boxed[-1].strip() if boxed else str(gold).strip()
        rewards.append(1.0 if _same_answer(extract_answer(completion_text(completion)), gold) else 0.0)
    return rewards


def exact_match_reward(completions: Sequence, solution: Sequence[str | None], **kwargs) -> list[float | None]:
    """1.0 when the completion text, stripped, equals the `solution` column, stripped (no answer extraction)."""
    return [None if gold is None else float(completion_text(c).strip() == str(gold).strip())
            for c, gold in zip(completions, solution, strict=True)]


def think_format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 when the completion is `<think>...</think>` (one think block, at the start) followed by the answer."""
    return [1.0 if _THINK_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def format_reward(pattern: str, *, name: str = "format_reward") -> Callable:
    """A reward function giving 1.0 to completions that fully match the regular expression `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions: Sequence, **kwargs) -> list[float]:
        return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    reward.__name__ = name
    return reward


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft length penalty (Yu et al. 2025, Eq. 13): 0 up to `max - cache` tokens, then linearly down to
    -1 at `max_completion_len`, -1 beyond."""

    def soft_overlong_punishment_reward(completion_ids: Sequence[Sequence[int]], **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= max_completion_len - soft_punish_cache:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((max_completion_len - soft_punish_cache - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment_reward


REWARD_FUNCTIONS = {
    "accuracy": accuracy_reward,
    "exact_match": exact_match_reward,
    "think_format": think_format_reward,
}


def resolve_reward_function(name_or_callable) -> Callable:
    """A reward function from a callable, a name in `REWARD_FUNCTIONS`, or `module.path:function`."""
    if callable(name_or_callable):
        return name_or_callable
    name = str(name_or_callable)
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        import importlib

        module, attribute = name.split(":", 1)
        return getattr(importlib.import_module(module), attribute)
    raise ValueError(f"Unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or 'module:function'.")


def reward_function_name(function: Callable) -> str:
    return getattr(function, "__name__", type(function).__name__)
