"""GRPO's curriculum: the bandit over prompt categories against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.curriculum import CategoryCurriculum

KINDS = ["share", "train", "share", "save", "train", "share"]  # prompts 0-5


def test_values_move_towards_the_mean_absolute_advantage_by_hand():
    c = CategoryCurriculum(KINDS, temperature=0.5, rate=0.1, seed=0)
    assert c.arms == ["save", "share", "train"]
    assert c.probabilities() == pytest.approx([1 / 3] * 3)  # all start at 1
    # groups answering prompts 0, 2 (share: |A| 0.4 and 0.6) and 4 (train: 0.0)
    totals = c.arm_sums([0, 2, 4], [0.4, 0.6, 0.0])
    assert totals == [0.0, 1.0, 0.0, 0.0, 2.0, 1.0]  # sums per arm, then counts
    c.update(totals)
    # two groups pull as two updates by their mean: 1 + (1 - 0.9^2) * (0.5 - 1)
    expected = [1.0, 1 + (1 - 0.9**2) * (0.5 - 1), 1 + 0.1 * (0.0 - 1)]
    torch.testing.assert_close(c.tensors["values"], torch.tensor(expected, dtype=torch.float64))
    # which equals the groups' own updates one after the other when they agree
    one = CategoryCurriculum(KINDS, 0.5, 0.1, 0)
    one.update(one.arm_sums([0], [0.5]))
    one.update(one.arm_sums([2], [0.5]))
    assert one.tensors["values"][1].item() == pytest.approx(expected[1])
    # chances: softmax(values / temperature)
    z = [math.exp(v / 0.5) for v in expected]
    assert c.probabilities() == pytest.approx([x / sum(z) for x in z])


def test_draws_follow_the_chances_and_are_a_function_of_seed_and_step():
    kinds = ["a"] * 50 + ["b"] * 50
    c = CategoryCurriculum(kinds, temperature=0.25, rate=0.1, seed=3)
    c.tensors["values"][:] = torch.tensor([1.0, 0.0])  # chance of "a": e^4 / (e^4 + 1) = 0.98
    steps = [c.draw(step, 4) for step in range(1, 101)]
    assert all(len(set(s)) == 4 for s in steps)  # no prompt twice in a step
    share_a = sum(i < 50 for s in steps for i in s) / 400
    assert 0.95 < share_a < 1.0
    assert c.tensors["draws"].tolist() == [round(share_a * 400), 400 - round(share_a * 400)]
    again = CategoryCurriculum(kinds, 0.25, 0.1, 3)
    again.tensors["values"][:] = torch.tensor([1.0, 0.0])
    assert again.draw(7, 4) == steps[6]  # the same step draws the same prompts
    assert again.draw(8, 4) != steps[6]
    # a category that runs out within a step leaves the others to fill it
    small = CategoryCurriculum(["a", "b", "b"], 0.01, 0.1, 0)
    small.tensors["values"][:] = torch.tensor([1.0, 0.0])
    assert sorted(small.draw(1, 3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="4 prompts a step, but only 3 exist"):
        small.draw(2, 4)


def test_summary_reports_values_and_shares_drawn():
    c = CategoryCurriculum(KINDS, 0.5, 0.1, 0)
    c.draw(1, 4)
    c.update(c.arm_sums([3], [0.25]))
    s = c.summary()
    assert s["save"]["value"] == pytest.approx(1 + 0.1 * (0.25 - 1))
    assert sum(x["share_drawn"] for x in s.values()) == pytest.approx(1.0)
