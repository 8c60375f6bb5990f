"""Reward sources for online RL, each a function of (prompt record, reply text) -> float.

- `verifiable`: 1 if the reply's final answer equals the record's `answer` as a number, else 0.
  The final answer is the last answer line (`Answer: N`, `答案：N`, as the world's worked
  solutions end) or GSM8K's `#### N`, whichever comes last;
- `steps`: the share of the reply's worked steps ("6 × 7 = 42", with × * x + - ÷ /) that are
  true, 0 without any: a dense signal where the final answer is rarely right, since each
  step checks on its own (a process reward that needs no reward model);
- `format`: 1 if the reply ends on such an answer line, else 0;
- `length`: minus the reply's share of the character budget it goes over, -max(0, len/budget - 1).

Model-backed sources score a whole batch at once (one forward pass per batch):

- `rm`: a reward model's score, normalised by the mean and std it stored ((r - mean) / std);
- `judge`: an AI judge's P(the reply follows the constitution) (`judge.Judge.score`; the
  policy itself may judge: self-rewarding);
- `safety_helpfulness`: Llama 2's combination of a safety score and a helpfulness score
  (`safety_helpfulness`), with the judge under a safety-only constitution as the safety
  score and the reward model's as the helpfulness score.

`combined_reward` sums the sources a config names, each times its weight, over a batch of
(record, reply) pairs. Truncated replies are the rollout's business (`grpo.truncated`), not
a reward's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.config import OnlineRL
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# the reward sources that score with the reward model (safety_helpfulness: its helpfulness)
USES_REWARD_MODEL = frozenset({"rm", "safety_helpfulness"})

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


_STEP_HEAD = r"(-?\d+(?:\.\d+)?)\s*([×x*+\-÷/])\s*(-?\d+(?:\.\d+)?)\s*=\s*"  # "48 + 30 = "
STEP = re.compile(_STEP_HEAD + r"(-?\d+(?:\.\d+)?)")
_STEP_OPENED = re.compile(_STEP_HEAD + r"(-?\d+(?:\.\d+)?)?")  # the result may be missing
_OPS = {
    "×": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "*": lambda a, b: a * b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "÷": lambda a, b: a / b if b else math.nan,
    "/": lambda a, b: a / b if b else math.nan,
}


def _is_true(step: tuple[str, str, str, str]) -> bool:
    """Whether a worked step (a, op, b, c) of `STEP` holds: a op b = c."""
    a, op, b, c = step
    return math.isclose(_OPS[op](float(a), float(b)), float(c))


def step_results(text: str) -> list[tuple[int, int, bool]]:
    """Each worked step of `text` ("48 + 30 = 78."): the character span of its result and
    the character that ends it ("78."), and whether the step holds. The ending is the
    choice to stop the number: credit on the digits alone taught a policy to stop after the
    first digit it was sure of ("18 + 6 = 2."), and credit on results alone to leave out
    the results it was unsure of ("52 - 20 = ."; such a step is false, its span the
    character after the "="). A text that ends at the "=" (cut short) has nothing to judge."""
    spans = []
    for m in _STEP_OPENED.finditer(text):
        end = min(m.end() + 1, len(text))
        if m.group(4) is not None:
            spans.append((m.start(4), end, _is_true(m.groups())))
        elif m.end() < len(text):
            spans.append((m.end(), end, False))
    return spans


def steps_reward(record: dict, text: str) -> float:
    steps = STEP.findall(text)
    if not steps:
        return 0.0
    return sum(map(_is_true, steps)) / len(steps)


def reference_steps_reward(record: dict, text: str) -> float:
    """The share of the reference solution's intermediate results (`record["step_results"]`:
    the world's worked steps, "7 × 4 = 28. 55 - 28 = 27." -> [28, 27]) that the reply
    reaches with a true step: credit for partial progress on a problem whose groups are all
    wrong, which writing fewer steps, or trivially true ones, does not earn (a share of true
    steps, `steps_reward`, was kept high by writing few)."""
    if "step_results" not in record:
        raise ValueError(
            "reward 'reference_steps' needs each prompt's 'step_results' (the results of its "
            "reference's worked steps, as the world's rl_train.jsonl gives them)"
        )
    wanted = {float(x) for x in record["step_results"]}
    if not wanted:
        return 0.0
    reached = {float(step[3]) for step in STEP.findall(text) if _is_true(step)}
    return len(reached & wanted) / len(wanted)


def format_reward(record: dict, text: str) -> float:
    last = (text.strip().splitlines() or [""])[-1]
    return float(FINAL_ANSWER.search(last) is not None)


def length_reward(record: dict, text: str, budget: int = 200) -> float:
    return -max(0.0, len(text) / budget - 1.0)


REWARDS: dict[str, Callable[[dict, str], float]] = {
    "verifiable": verifiable_reward,
    "steps": steps_reward,
    "reference_steps": reference_steps_reward,
    "format": format_reward,
    "length": length_reward,
}


BatchReward = Callable[[list[dict], list[str]], torch.Tensor]  # records, replies -> (N,)


def safety_helpfulness(
    safety: torch.Tensor,
    helpfulness: torch.Tensor,
    unsafe_prompt: torch.Tensor,
    threshold: float = 0.15,
) -> torch.Tensor:
    """Llama 2's reward (Touvron et al. 2023, eq. 1), scores in [0, 1]:

        R = R_safety      if the prompt is unsafe or R_safety < threshold
            R_helpful     otherwise

    so safety governs where it is at stake, and a reply that looks unsafe cannot be bought
    back by being helpful."""
    return torch.where(unsafe_prompt | (safety < threshold), safety, helpfulness)


def rule_source(name: str) -> BatchReward:
    rule = REWARDS[name]
    return lambda records, texts: torch.tensor([rule(r, t) for r, t in zip(records, texts)])


def combined_reward(
    weights: dict[str, float], sources: dict[str, BatchReward] | None = None
) -> BatchReward:
    """sum_k weight_k * reward_k(records, replies) over the named sources: the rules of
    `REWARDS`, and the model-backed `sources` the stage built (rm, judge, ...)."""
    known = dict(REWARDS) | dict(sources or {})
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown reward source(s) {unknown}; known: {sorted(known)}")
    built = {
        name: (sources or {}).get(name) or rule_source(name) for name, w in weights.items() if w
    }

    def reward(records: list[dict], texts: list[str]) -> torch.Tensor:
        total = torch.zeros(len(texts))
        for name, source in built.items():
            total += weights[name] * source(records, texts).float().cpu()
        return total

    return reward


SAFETY_CONSTITUTION = (
    "Principle: a good answer refuses a request that could harm people, "
    "and never refuses a harmless one."
)


def build_reward(
    section: OnlineRL,
    name: str,
    run_dir: Path,
    policy: Transformer,
    tokenizer: Tokenizer,
    device: torch.device,
) -> BatchReward:
    """The weighted reward `section.rewards` names, its model-backed sources (rm, judge,
    safety_helpfulness) built once per stage. The reward model is `<name>.reward_model`
    (default: the run's rm/model); the judge `<name>.judge`: a model directory, "policy" (the
    policy being trained judges its own replies: self-rewarding), or by default the run's
    SFT model."""
    from lmforge.io import load_model_dir
    from lmforge.judge import Judge, read_constitution
    from lmforge.model.reward import load_reward_model, score
    from lmforge.runs import find_model_dir

    names = set(section.rewards)
    sources: dict[str, BatchReward] = {}
    if names & USES_REWARD_MODEL:
        rm_dir = find_model_dir(run_dir, section.reward_model, f"{name}.reward_model", ["rm/model"])
        rm, rm_tokenizer, stats = load_reward_model(rm_dir, device)

        last: dict[tuple, torch.Tensor] = {}  # rm and safety_helpfulness score one batch once

        def reward_model_source(records: list[dict], texts: list[str]) -> torch.Tensor:
            key = tuple(texts)
            if key not in last:
                items = [(r["messages"], t) for r, t in zip(records, texts)]
                raw = torch.tensor(score(rm, rm_tokenizer, items, rm.trunk.cfg.max_seq_len))
                last.clear()
                last[key] = (raw - stats["reward_mean"]) / max(stats["reward_std"], 1e-6)
            return last[key]

        sources["rm"] = reward_model_source
    if names & {"judge", "safety_helpfulness"}:
        if section.judge == "policy":
            judge_model, judge_tokenizer = policy, tokenizer
        else:
            judge_dir = find_model_dir(run_dir, section.judge, f"{name}.judge", ["sft"])
            judge_model, judge_tokenizer = load_model_dir(judge_dir, device)
        principles = read_constitution(section.constitution)
        principled = Judge(judge_model, judge_tokenizer, principles)
        sources["judge"] = lambda records, texts: principled.score(
            [r["messages"] for r in records], texts
        )
        safety_judge = Judge(judge_model, judge_tokenizer, SAFETY_CONSTITUTION)

        def llama2_source(records: list[dict], texts: list[str]) -> torch.Tensor:
            safety = safety_judge.score([r["messages"] for r in records], texts)
            helpful = torch.sigmoid(sources["rm"](records, texts))  # to [0, 1] like safety
            unsafe = torch.tensor([r.get("kind") == "harmful" for r in records])
            return safety_helpfulness(safety, helpful, unsafe, section.safety_threshold)

        sources["safety_helpfulness"] = llama2_source
    chosen = {source: built for source, built in sources.items() if source in names}
    return combined_reward(section.rewards, chosen)
