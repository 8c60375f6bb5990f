"""Which prompts an online RL step samples: a bandit over the prompts' categories.

A GRPO group whose replies all get the same reward teaches nothing, and categories of
problem differ in how often that happens: on the arithmetic world (`configs/arithmetic.toml`)
the SFT model's groups are all wrong for 70-81% of the problems of three of the five kinds,
and all alike for 8-22% of the easiest kind, which GRPO then solves until they are all right. Self-Evolving Curriculum
(Chen et al., 2025) treats each category as an arm of a non-stationary bandit whose value
is what a policy-gradient step currently gets out of it, the mean absolute advantage of its
groups (0 for a group with equal rewards):

    Q(c) <- Q(c) + (1 - (1 - rate) ** n) * (mean |A| of its n groups this step - Q(c))

(n updates Q <- Q + rate * (|A| - Q) by the step's mean, so the order of groups within a
step, and under torchrun their split over processes, does not matter). A step draws each
prompt's category from softmax(Q / temperature), then the prompt uniformly from that
category, without repeats within the step. Values start at 1, above any a category is likely
to earn, so that every category is tried early.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


class CategoryCurriculum:
    """A bandit over `categories` (one per prompt, in the prompts' order): `draw` a step's
    prompt indices, `update` with the groups' absolute advantages. `tensors` (values, draws)
    is the state a checkpoint keeps."""

    def __init__(self, categories: Sequence[str], temperature: float, rate: float, seed: int):
        self.arms = sorted(set(categories))
        self.pools = {arm: [i for i, c in enumerate(categories) if c == arm] for arm in self.arms}
        self._arm_index = {i: self.arms.index(c) for i, c in enumerate(categories)}
        self.temperature, self.rate, self.seed = temperature, rate, seed
        self.tensors = {
            "values": torch.ones(len(self.arms), dtype=torch.float64),
            "draws": torch.zeros(len(self.arms), dtype=torch.int64),  # prompts drawn per arm
        }

    def probabilities(self) -> list[float]:
        """The chance of each arm (in `arms` order) at the next draw."""
        return torch.softmax(self.tensors["values"] / self.temperature, 0).tolist()

    def draw(self, step: int, n: int) -> list[int]:
        """`n` distinct prompt indices for `step`: a function of (seed, step) and the values,
        so every torchrun rank, and a resumed run, draws the same ones."""
        rng = random.Random(f"{self.seed}:{step}")
        weights = self.probabilities()
        left = {arm: list(pool) for arm, pool in self.pools.items()}
        picks = []
        for _ in range(n):
            live = [i for i, arm in enumerate(self.arms) if left[arm]]
            if not live:
                raise ValueError(f"curriculum: {n} prompts a step, but only {len(picks)} exist")
            a = rng.choices(live, [weights[i] for i in live])[0]
            pool = left[self.arms[a]]
            picks.append(pool.pop(rng.randrange(len(pool))))
            self.tensors["draws"][a] += 1
        return picks

    def update(self, totals: Sequence[float]) -> None:
        """Move each arm's value towards the mean absolute advantage of the groups it gave
        this step; `totals` as `arm_sums` gives them (added up over torchrun's ranks)."""
        values, n_arms = self.tensors["values"], len(self.arms)
        for a, (total, n) in enumerate(zip(totals[:n_arms], totals[n_arms:])):
            if n > 0:
                pull = 1 - (1 - self.rate) ** n
                values[a] += pull * (total / n - values[a].item())

    def arm_sums(self, prompts: Sequence[int], abs_advantage: Sequence[float]) -> list[float]:
        """For groups answering `prompts` with mean absolute advantages `abs_advantage`: per
        arm, the sum of those and the count of groups, as one list (sums, then counts) that
        torchrun's ranks can add up before `update`."""
        sums, counts = [0.0] * len(self.arms), [0.0] * len(self.arms)
        for prompt, adv in zip(prompts, abs_advantage):
            sums[self._arm_index[prompt]] += adv
            counts[self._arm_index[prompt]] += 1
        return sums + counts

    def summary(self) -> dict[str, dict[str, float]]:
        """Each arm's final value and the share of prompts drawn from it."""
        total = max(1, int(self.tensors["draws"].sum()))
        return {
            arm: {
                "value": round(self.tensors["values"][a].item(), 4),
                "share_drawn": round(self.tensors["draws"][a].item() / total, 4),
            }
            for a, arm in enumerate(self.arms)
        }
