"""Reward sources for online RL, each a function of (prompt record, reply text) -> float.

- `verifiable`: 1 if the reply's final answer equals the record's `answer` as a number, else 0.
  The final answer is the last answer line (`Answer: N`, `答案：N`, as the world's worked
  solutions end) or GSM8K's `#### N`, whichever comes last;
- `steps`: the share of the reply's worked steps ("6 × 7 = 42", with × * x + - ÷ /) that are
  true, 0 without any: a dense signal where the final answer is rarely right, since each
  step checks on its own (a process reward that needs no reward model);
- `format`: 1 if the reply ends on such an answer line, else 0;
- `length`: minus the reply's share of the character budget it goes over, -max(0, len/budget - 1).

`combined_reward` sums the sources a config names, each times its weight. Truncated replies
are the rollout's business (`grpo.truncated`), not a reward's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

# a number as people write it: sign, thousands separators, decimals ("-1,234.5", "3")
_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)"
FINAL_ANSWER = re.compile(r"(?:(?:Answer|答案)\s*[:：]|####)\s*[$¥]?\s*" + _NUMBER)


def final_answer(text: str) -> float | None:
    """The number of the reply's last answer line or `#### N`, or None."""
    found = FINAL_ANSWER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # e.g. "1,,2." is matched by the pattern but is no number
        return None


def answer_value(answer: object) -> float:
    """A record's reference answer as a number: an int, a float, or a string such as "72",
    "1,234" or a whole GSM8K solution ending in "#### 72"."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a number")
    if isinstance(answer, int | float):
        return float(answer)
    if isinstance(answer, str):
        value = final_answer(answer) if "####" in answer else None
        if value is None:
            value = float(answer.strip().replace(",", ""))
        return value
    raise ValueError(f"answer {answer!r} is not a number")


def verifiable_reward(record: dict, text: str) -> float:
    got = final_answer(text)
    return float(got is not None and math.isclose(got, answer_value(record["answer"])))


STEP = re.compile(r"(-?\d+(?:\.\d+)?)\s*([×x*+\-÷/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_OPS = {
    "×": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "*": lambda a, b: a * b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "÷": lambda a, b: a / b if b else math.nan,
    "/": lambda a, b: a / b if b else math.nan,
}


def steps_reward(record: dict, text: str) -> float:
    steps = STEP.findall(text)
    if not steps:
        return 0.0
    true = sum(math.isclose(_OPS[op](float(a), float(b)), float(c)) for a, op, b, c in steps)
    return true / len(steps)


def format_reward(record: dict, text: str) -> float:
    last = (text.strip().splitlines() or [""])[-1]
    return float(FINAL_ANSWER.search(last) is not None)


def length_reward(record: dict, text: str, budget: int = 200) -> float:
    return -max(0.0, len(text) / budget - 1.0)


REWARDS: dict[str, Callable[[dict, str], float]] = {
    "verifiable": verifiable_reward,
    "steps": steps_reward,
    "format": format_reward,
    "length": length_reward,
}


def combined_reward(weights: dict[str, float]) -> Callable[[dict, str], float]:
    """sum_k weight_k * reward_k(record, text) over the named sources of `REWARDS`."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward source(s) {unknown}; known: {sorted(REWARDS)}")

    def reward(record: dict, text: str) -> float:
        return sum(w * REWARDS[name](record, text) for name, w in weights.items() if w)

    return reward
