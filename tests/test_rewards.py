"""Ready reward functions: TRL's calling convention and their values."""

import pytest

from jaxpt import rewards


def test_accuracy_reward_extracts_the_final_answer():
    completions = ["7", "the answer is 12", r"so \boxed{3/4}", "no idea", [{"role": "assistant", "content": "5"}]]
    solutions = ["7", "12.0", "3/4", "4", "6"]
    assert rewards.accuracy_reward(completions=completions, solution=solutions) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert rewards.accuracy_reward(completions=["1"], solution=[None]) == [None]


def test_think_format_and_format_factory():
    assert rewards.think_format_reward(completions=["<think>a</think>b", "<think>a", "x<think>a</think>"]) == [
        1.0, 0.0, 0.0]
    digits = rewards.format_reward(r"\d+", name="digits")
    assert digits(completions=["12", " 7 ", "x1"]) == [1.0, 1.0, 0.0]
    assert digits.__name__ == "digits"


def test_soft_overlong_punishment_matches_dapo():
    reward = rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert reward(completion_ids=[[0] * 80, [0] * 90, [0] * 101]) == [0.0, -0.5, -1.0]


def test_resolve_reward_function():
    assert rewards.resolve_reward_function("accuracy") is rewards.accuracy_reward
    assert rewards.resolve_reward_function("accuracy_reward") is rewards.accuracy_reward
    assert rewards.resolve_reward_function("jaxpt.rewards:think_format_reward") is rewards.think_format_reward
    assert rewards.resolve_reward_function("jaxpt.rewards.exact_match_reward") is rewards.exact_match_reward
    with pytest.raises(ValueError, match="Unknown reward function 'nope'"):
        rewards.resolve_reward_function("nope")
