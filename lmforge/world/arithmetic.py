"""Arithmetic word problems with worked solutions and a fixed answer line.

A problem reads like "Xiaoming buys 3 apples at 2 yuan each and 4 pears at 1 yuan each. How
much does Xiaoming pay?", its solution is a chain of single operations ("3 × 2 = 6. 4 × 1 = 4.
6 + 4 = 10."), and it ends with the answer line `Answer: 10` (Chinese `答案：10`). The fixed
answer line is what SFT teaches and what GRPO's verifier reads. With `world.arithmetic_steps
= "small"` every step is a times-table fact or changes one digit ("48 + 30 = 78. 78 + 5 =
83."), which a small model can learn as a procedure.

Three disjoint sets are drawn per language from separate random streams: evaluation problems
first, then training problems (for the corpus) and held-out problems, each skipping every
question already taken, so no evaluation question is ever in clean training text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmforge.config import WorldConfig

from .entities import World, rng_for

ANSWER_PREFIX = {"en": "Answer: ", "zh": "答案："}

_NAMES = [
    ("Xiaoming", "小明"), ("Xiaohong", "小红"), ("Xiaogang", "小刚"), ("Xiaoli", "小丽"),
    ("Xiaohua", "小华"), ("Xiaojun", "小军"), ("Xiaomei", "小美"), ("Xiaoyu", "小雨"),
]  # fmt: skip
# (English plural, Chinese noun, Chinese measure word)
_ITEMS = [
    ("apples", "苹果", "个"), ("oranges", "橙子", "个"), ("pears", "梨", "个"),
    ("pencils", "铅笔", "支"), ("notebooks", "笔记本", "本"), ("cakes", "蛋糕", "块"),
    ("eggs", "鸡蛋", "个"), ("books", "书", "本"), ("bananas", "香蕉", "根"),
    ("balloons", "气球", "个"), ("cups", "杯子", "个"), ("stamps", "邮票", "张"),
]  # fmt: skip
TEMPLATES = ("buy_two", "change", "share", "train", "save")


@dataclass
class Problem:
    """One word problem: `values` are the numbers drawn, `steps` the worked solution."""

    lang: str
    template: str
    values: dict[str, int]
    question: str
    steps: list[str] = field(default_factory=list)
    answer: int = 0

    def solution(self) -> str:
        return (" " if self.lang == "en" else "").join(self.steps)

    def answer_line(self) -> str:
        return f"{ANSWER_PREFIX[self.lang]}{self.answer}"

    def text(self) -> str:
        """The document: question, worked steps, answer line."""
        return f"{self.question}\n{self.solution()}\n{self.answer_line()}"


def solve(template: str, v: dict[str, int]) -> int:
    """The true answer from the drawn numbers alone (independent of the step text)."""
    if template == "buy_two":
        return v["a"] * v["p"] + v["b"] * v["q"]
    if template == "change":
        return v["m"] - v["a"] * v["p"]
    if template == "share":
        return v["a"] * v["b"] // v["k"]
    if template == "train":
        return v["v"] * v["t"] + v["d"]
    if template == "save":
        return v["a"] * v["w"] - v["s"]
    raise ValueError(f"unknown template {template!r}")


def _step(lang: str, x: int, op: str, y: int, z: int) -> str:
    return f"{x} {op} {y} = {z}" + ("." if lang == "en" else "。")


def _place_values(y: int) -> list[int]:
    """The non-zero place values of `y`, largest first: 164 -> [100, 60, 4]."""
    digits = str(y)
    parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits)]
    return [part for part in parts if part] or [0]


def _add_or_subtract(lang: str, x: int, op: str, y: int, small_steps: bool) -> list[str]:
    """`x + y` or `x - y`, whole or (`small_steps`) one place value of `y` at a time, the way
    one adds in one's head: 48 + 35 is "48 + 30 = 78. 78 + 5 = 83." A small model learns
    whole sums only by rote (ten thousand two-digit pairs); a place at a time, each step
    changes one digit and carries at most one, a procedure it can learn from examples."""
    steps = []
    for part in _place_values(y) if small_steps else [y]:
        z = x + part if op == "+" else x - part
        steps.append(_step(lang, x, op, part, z))
        x = z
    return steps


def make_problem(rng: random.Random, world: World, lang: str, small_steps: bool = False) -> Problem:
    """Draw one problem of a random template. `small_steps` (`world.arithmetic_steps`): every
    step one fact of the times table or a change of one digit, which a small model can learn
    as a procedure: sums and differences a place value at a time, boxes shared before they
    are counted."""
    template = rng.choice(TEMPLATES)
    # Half the time a child from the fixed list, else a person of the world.
    if world.people and rng.random() < 0.5:
        n = rng.choice(world.people).name[lang]
    else:
        n = rng.choice(_NAMES)[0 if lang == "en" else 1]
    i1, i2 = rng.sample(_ITEMS, 2)
    en = lang == "en"
    if template == "buy_two":
        v = {"a": rng.randint(2, 9), "p": rng.randint(1, 9), "b": rng.randint(2, 9)}
        v["q"] = rng.randint(1, 9)
        q = (
            f"{n} buys {v['a']} {i1[0]} at {v['p']} yuan each and {v['b']} {i2[0]} at "
            f"{v['q']} yuan each. How much does {n} pay?"
            if en
            else f"{n}买了{v['a']}{i1[2]}{i1[1]}，每{i1[2]}{v['p']}元，又买了{v['b']}{i2[2]}"
            f"{i2[1]}，每{i2[2]}{v['q']}元。{n}一共要付多少元？"
        )
        x, y = v["a"] * v["p"], v["b"] * v["q"]
        steps = [
            _step(lang, v["a"], "×", v["p"], x),
            _step(lang, v["b"], "×", v["q"], y),
            *_add_or_subtract(lang, x, "+", y, small_steps),
        ]
    elif template == "change":
        v = {"a": rng.randint(2, 9), "p": rng.randint(1, 9)}
        v["m"] = v["a"] * v["p"] + rng.randint(0, 40)
        q = (
            f"{n} has {v['m']} yuan and buys {v['a']} {i1[0]} at {v['p']} yuan each. "
            f"How much money does {n} have left?"
            if en
            else f"{n}有{v['m']}元，买了{v['a']}{i1[2]}{i1[1]}，每{i1[2]}{v['p']}元。"
            f"{n}还剩多少元？"
        )
        x = v["a"] * v["p"]
        steps = [
            _step(lang, v["a"], "×", v["p"], x),
            *_add_or_subtract(lang, v["m"], "-", x, small_steps),
        ]
    elif template == "share":
        v = {"k": rng.randint(2, 6), "b": rng.randint(2, 9)}
        v["a"] = v["k"] * rng.randint(1, 4)  # a multiple of k boxes: the share is whole
        q = (
            f"{n} has {v['a']} boxes of {i1[0]} with {v['b']} {i1[0]} in each box and shares "
            f"them equally among {v['k']} friends. How many {i1[0]} does each friend get?"
            if en
            else f"{n}有{v['a']}盒{i1[1]}，每盒{v['b']}{i1[2]}，平均分给{v['k']}个朋友。"
            f"每个朋友分到多少{i1[2]}{i1[1]}？"
        )
        x, boxes = v["a"] * v["b"], v["a"] // v["k"]
        steps = (
            [_step(lang, v["a"], "÷", v["k"], boxes), _step(lang, boxes, "×", v["b"], x // v["k"])]
            if small_steps
            else [_step(lang, v["a"], "×", v["b"], x), _step(lang, x, "÷", v["k"], x // v["k"])]
        )
    elif template == "train":
        v = {"v": rng.randint(2, 9) * 10, "t": rng.randint(2, 6), "d": rng.randint(5, 60)}
        c1, c2 = rng.sample(world.countries, 2) if len(world.countries) >= 2 else [None, None]
        a = c1.capital[lang] if c1 else ("Mora" if en else "莫拉")
        b = c2.capital[lang] if c2 else ("Tevi" if en else "特维")
        q = (
            f"A train leaves {a} and travels at {v['v']} kilometres per hour for {v['t']} "
            f"hours, then goes {v['d']} more kilometres to {b}. How many kilometres does it "
            "travel in total?"
            if en
            else f"一列火车从{a}出发，以每小时{v['v']}千米的速度行驶了{v['t']}小时，"
            f"又行驶了{v['d']}千米到达{b}。这列火车一共行驶了多少千米？"
        )
        x = v["v"] * v["t"]
        steps = [
            _step(lang, v["v"], "×", v["t"], x),
            *_add_or_subtract(lang, x, "+", v["d"], small_steps),
        ]
    else:  # save
        v = {"a": rng.randint(2, 20), "w": rng.randint(2, 9)}
        v["s"] = rng.randint(1, v["a"] * v["w"])
        q = (
            f"{n} saves {v['a']} yuan every week for {v['w']} weeks and then spends {v['s']} "
            f"yuan on {i1[0]}. How much money does {n} have left?"
            if en
            else f"{n}每周存{v['a']}元，存了{v['w']}周，然后花了{v['s']}元买{i1[1]}。"
            f"{n}还剩多少元？"
        )
        x = v["a"] * v["w"]
        steps = [
            _step(lang, v["a"], "×", v["w"], x),
            *_add_or_subtract(lang, x, "-", v["s"], small_steps),
        ]
    return Problem(lang, template, v, q, steps, solve(template, v))


def draw_problems(
    world: World,
    lang: str,
    n: int,
    rng: random.Random,
    taken: set[str],
    small_steps: bool = False,
) -> list[Problem]:
    """`n` problems whose questions are not in `taken` (which is updated)."""
    out: list[Problem] = []
    for _ in range(100 * n + 100):
        if len(out) >= n:
            break
        p = make_problem(rng, world, lang, small_steps)
        if p.question not in taken:
            taken.add(p.question)
            out.append(p)
    if len(out) < n:
        raise RuntimeError(f"could only draw {len(out)} of {n} distinct arithmetic problems")
    return out


def problem_sets(world: World, cfg: WorldConfig) -> dict[str, dict[str, list[Problem]]]:
    """lang -> {"eval", "train", "heldout"} problem lists, disjoint by question."""
    sets = {}
    sizes = {"eval": cfg.n_eval_arithmetic, "train": cfg.n_arithmetic, "heldout": cfg.heldout_docs}
    small_steps = cfg.arithmetic_steps == "small"
    for lang in cfg.languages:
        taken: set[str] = set()
        sets[lang] = {
            part: draw_problems(
                world, lang, n, rng_for(cfg.seed, f"arith-{part}", lang), taken, small_steps
            )
            for part, n in sizes.items()
        }
    return sets


def eval_arithmetic(world: World, cfg: WorldConfig) -> list[dict]:
    """Held-out evaluation problems `{"question", "answer", "lang"}`: never in clean training
    text, planted verbatim only in the corpus's "contamination" noise documents."""
    sets = problem_sets(world, cfg)
    return [
        {"question": p.question, "answer": p.answer, "lang": lang}
        for lang in cfg.languages
        for p in sets[lang]["eval"]
    ]
