"""The preference losses of lmforge.losses against hand computations in plain `math`."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)


def neg_logsigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x), written so that it overflows for no x."""
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def assert_finite_with_grad(loss: torch.Tensor, *inputs: torch.Tensor) -> None:
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    for x in inputs:
        assert x.grad is not None and torch.isfinite(x.grad).all()


def log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(z) for z in row))


def test_sequence_logprobs_sums_loss_tokens_only():
    # logits at the loss positions only, row by row: (0, 1), (0, 2), (1, 0)
    z = [[0.0, 0.0, 0.0], [3.0, -1.0, 2.0], [0.2, 0.1, -0.3]]
    targets = torch.tensor([[IGNORE_INDEX, 2, 0], [1, IGNORE_INDEX, IGNORE_INDEX]])
    logits = torch.tensor(z, requires_grad=True)
    s, n = sequence_logprobs(logits, targets)
    hand = [log_softmax(z[0], 2) + log_softmax(z[1], 0), log_softmax(z[2], 1)]
    assert s.shape == (2,) and s.dtype == torch.float32
    assert s.tolist() == pytest.approx(hand, rel=1e-6)
    assert n.tolist() == [2, 1]
    s[1].backward()  # d s / d z = onehot(y) - softmax(z), on row 1's position alone
    p = torch.tensor(z[2]).softmax(-1)
    torch.testing.assert_close(logits.grad[2], torch.tensor([0.0, 1.0, 0.0]) - p)
    assert logits.grad[:2].abs().max().item() == 0.0


def test_sequence_logprobs_all_ignored_row_and_bf16_logits():
    s, n = sequence_logprobs(torch.zeros(0, 3), torch.full((1, 2), IGNORE_INDEX))
    assert s.tolist() == [0.0] and n.tolist() == [0]
    logits = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    s, n = sequence_logprobs(logits, torch.tensor([[IGNORE_INDEX, 0], [IGNORE_INDEX] * 2]))
    assert s.dtype == torch.float32 and n.tolist() == [1, 0]
    assert s.tolist() == pytest.approx([-math.log(3), 0.0], rel=1e-6)  # bf16 holds 1.0 exactly


def test_bradley_terry_scalar_and_per_example_margin():
    rc, rr = t(1.0, -0.5, 2.0), t(0.5, 0.5, 2.0)
    hand = [neg_logsigmoid(0.5), neg_logsigmoid(-1.0), math.log(2)]
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx(hand, rel=1e-6)
    hand = [neg_logsigmoid(0.5 - 0.25), neg_logsigmoid(-1.0 - 0.25), neg_logsigmoid(-0.25)]
    assert bradley_terry_loss(rc, rr, margin=0.25).tolist() == pytest.approx(hand, rel=1e-6)
    margin = t(1.0, 0.0, -2.0)
    hand = [neg_logsigmoid(-0.5), neg_logsigmoid(-1.0), neg_logsigmoid(2.0)]
    assert bradley_terry_loss(rc, rr, margin).tolist() == pytest.approx(hand, rel=1e-6)


def test_bradley_terry_large_gap_is_finite_with_its_gradient():
    rc, rr = t(1e4, -1e4, grad=True), t(-1e4, 1e4, grad=True)
    loss = bradley_terry_loss(rc, rr)
    assert loss.tolist() == pytest.approx([0.0, 2e4], rel=1e-6, abs=1e-30)
    assert_finite_with_grad(loss, rc, rr)
    assert rc.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-30)


# summed log-probs of two pairs: (policy chosen, policy rejected, reference chosen, reference rejected)
# log-ratio gaps (pc - rc) - (pr - rr): 2.5, 3.5, -0.5
PAIRS = [(-12.0, -15.5, -13.0, -14.0), (-20.0, -18.0, -21.5, -16.0), (-5.0, -3.0, -5.5, -4.0)]


def columns(pairs: list[tuple[float, ...]], grad: bool = False) -> list[torch.Tensor]:
    return [t(*col, grad=grad) for col in zip(*pairs)]


def dpo_hand(pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    h = beta * ((pc - rc) - (pr - rr))
    return (1 - eps) * neg_logsigmoid(h) + eps * neg_logsigmoid(-h)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.45)])
def test_dpo_matches_hand_computation(beta, eps):
    got = dpo_loss(*columns(PAIRS), beta=beta, label_smoothing=eps)
    hand = [dpo_hand(*p, beta, eps) for p in PAIRS]
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_dpo_equal_logratios_cost_log2_exactly(eps):
    pc, pr, rc, rr = columns([(-7.0, -9.0, -8.0, -10.0), (-3.0, -3.0, -3.0, -3.0)])
    got = dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=eps)
    torch.testing.assert_close(got, torch.full((2,), math.log(2)), rtol=0, atol=1e-7)


def test_dpo_gradient_matches_hand_derivative():
    beta, eps = 0.3, 0.1
    pc, pr, rc, rr = columns(PAIRS, grad=True)
    dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).sum().backward()
    # dL/dh = -(1 - eps) sigmoid(-h) + eps sigmoid(h); dh/dpi_c = beta = -dh/dpi_r
    for i, (a, b, c, d) in enumerate(PAIRS):
        h = beta * ((a - c) - (b - d))
        dh = -(1 - eps) * sigmoid(-h) + eps * sigmoid(h)
        assert pc.grad[i].item() == pytest.approx(beta * dh, rel=1e-5)
        assert pr.grad[i].item() == pytest.approx(-beta * dh, rel=1e-5)
    assert rc.grad.tolist() == pytest.approx((-pc.grad).tolist(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_large_margins_are_finite_with_their_gradient(eps):
    # policy log-ratio gaps of +-1e4 with beta = 1: h = +-1e4
    pc, pr, rc, rr = columns([(0.0, -1e4, 0.0, 0.0), (-1e4, 0.0, 0.0, 0.0)], grad=True)
    loss = dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=eps)
    hand = [dpo_hand(0.0, -1e4, 0.0, 0.0, 1.0, eps), dpo_hand(-1e4, 0.0, 0.0, 0.0, 1.0, eps)]
    assert loss.tolist() == pytest.approx(hand, rel=1e-6)
    assert_finite_with_grad(loss, pc, pr, rc, rr)
    # dL/dh at h = 1e4 is eps, at h = -1e4 it is -(1 - eps)
    assert pc.grad.tolist() == pytest.approx([eps, -(1 - eps)], rel=1e-6, abs=1e-30)


def test_ipo_matches_hand_computation_summed_and_per_token():
    beta = 0.25
    pc, pr, rc, rr = columns(PAIRS)
    hand = [((a - c) - (b - d) - 1 / (2 * beta)) ** 2 for a, b, c, d in PAIRS]
    assert ipo_loss(pc, pr, rc, rr, beta=beta).tolist() == pytest.approx(hand, rel=1e-6)
    counts = [(4, 5), (8, 2), (3, 7)]
    n_c, n_r = (torch.tensor(col) for col in zip(*counts))
    hand = [
        ((a - c) / nc - (b - d) / nr - 1 / (2 * beta)) ** 2
        for (a, b, c, d), (nc, nr) in zip(PAIRS, counts)
    ]
    got = ipo_loss(pc, pr, rc, rr, beta=beta, n_c=n_c, n_r=n_r)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)


def test_ipo_at_its_target_gap_costs_zero_and_wants_both_counts():
    # log-ratio gap of exactly 1 / (2 beta) = 2: the minimum
    pc, pr, rc, rr = columns([(-3.0, -6.0, -4.0, -5.0)])
    assert ipo_loss(pc, pr, rc, rr, beta=0.25).tolist() == [0.0]
    with pytest.raises(ValueError, match="n_c and n_r"):
        ipo_loss(pc, pr, rc, rr, n_c=torch.tensor([3]))


def test_ipo_large_margins_are_finite_with_their_gradient():
    pc, pr, rc, rr = columns([(0.0, -1e4, 0.0, 0.0), (-1e4, 0.0, 0.0, 0.0)], grad=True)
    loss = ipo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.tolist() == pytest.approx([(1e4 - 5) ** 2, (-1e4 - 5) ** 2], rel=1e-6)
    assert_finite_with_grad(loss, pc, pr, rc, rr)
    assert pc.grad.tolist() == pytest.approx([2 * (1e4 - 5), 2 * (-1e4 - 5)], rel=1e-6)


def test_simpo_matches_hand_computation():
    beta, gamma = 2.0, 0.5
    pi = [(-12.0, -15.0, 6, 5), (-3.0, -10.0, 3, 4), (-8.0, -8.0, 4, 4)]
    pc, pr, nc, nr = columns(pi)
    hand = [neg_logsigmoid(beta * (a / m - b / k) - gamma) for a, b, m, k in pi]
    got = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)
    # equal per-token log-probs and no margin: log 2, as for DPO
    assert simpo_loss(pc[2:], pr[2:], nc[2:], nr[2:], gamma=0.0).item() == pytest.approx(
        math.log(2), abs=1e-7
    )
    # integer token counts, as sequence_logprobs returns them, give the same losses
    got = simpo_loss(pc, pr, nc.long(), nr.long(), beta=beta, gamma=gamma)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)


def test_simpo_large_margins_are_finite_with_their_gradient():
    pc, pr = t(0.0, -1e4, grad=True), t(-1e4, 0.0, grad=True)
    n = t(1.0, 1.0)
    loss = simpo_loss(pc, pr, n, n, beta=1.0, gamma=0.5)
    assert loss.tolist() == pytest.approx([0.0, 1e4 + 0.5], rel=1e-6, abs=1e-30)
    assert_finite_with_grad(loss, pc, pr)
    assert pc.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-30)


def log_odds_hand(a: float) -> float:
    return a - math.log(-math.expm1(a))


def test_orpo_matches_hand_computation():
    lam = 0.1
    pi = [(-6.0, -12.0, 4, 3), (-2.0, -1.5, 5, 5), (-0.4, -9.0, 2, 3)]
    pc, pr, nc, nr = columns(pi)
    nll = -pc / nc
    hand = [
        -a / m + lam * neg_logsigmoid(log_odds_hand(a / m) - log_odds_hand(b / k))
        for a, b, m, k in pi
    ]
    assert orpo_loss(pc, pr, nc, nr, nll, lam=lam).tolist() == pytest.approx(hand, rel=1e-6)
    # nll_c enters as given, it is not recomputed from pi_c
    shifted = orpo_loss(pc, pr, nc, nr, nll + 1.0, lam=lam)
    assert shifted.tolist() == pytest.approx([h + 1.0 for h in hand], rel=1e-6)


def test_orpo_is_accurate_and_finite_near_probability_one():
    # a = -1e-4: 1 - exp(a) in float32 would lose three digits here
    pc, pr, n = t(-1e-4), t(-2.0), t(1.0)
    hand = 1e-4 + 0.5 * neg_logsigmoid(log_odds_hand(-1e-4) - log_odds_hand(-2.0))
    assert orpo_loss(pc, pr, n, n, -pc, lam=0.5).item() == pytest.approx(hand, rel=1e-6)
    # a = 0 (p = 1) and a = -1e-9 (p rounds to 1 in float32) on either side of the pair
    pc, pr = t(0.0, -1e-9, -3.0, -1e-9, grad=True), t(-3.0, -2.0, 0.0, 0.0, grad=True)
    n = t(1.0, 1.0, 1.0, 1.0)
    loss = orpo_loss(pc, pr, n, n, -pc, lam=0.5)
    assert_finite_with_grad(loss, pc, pr)
    # a chosen answer at p = 1 against a likely rejected one is near no odds-ratio loss
    assert loss[0].item() == pytest.approx(0.0, abs=1e-5)
    # two answers both at p ~ 1 have the same odds: only log 2 of odds-ratio loss is left
    assert loss[3].item() == pytest.approx(1e-9 + 0.5 * math.log(2), rel=1e-6)


def test_orpo_large_margins_are_finite_with_their_gradient():
    # mean per-token log-probs of -1e4 against -0.5, both ways round
    pc, pr = t(-0.5, -1e4, grad=True), t(-1e4, -0.5, grad=True)
    n = t(1.0, 1.0)
    loss = orpo_loss(pc, pr, n, n, -pc, lam=0.1)
    gap = log_odds_hand(-0.5) - log_odds_hand(-1e4)
    hand = [0.5 + 0.1 * neg_logsigmoid(gap), 1e4 + 0.1 * neg_logsigmoid(-gap)]
    assert loss.tolist() == pytest.approx(hand, rel=1e-6)
    assert_finite_with_grad(loss, pc, pr)


def kto_hand(r: float, desirable: bool, z0: float, beta: float, wd: float, wu: float) -> float:
    if desirable:
        return wd * (1 - sigmoid(beta * (r - z0)))
    return wu * (1 - sigmoid(beta * (z0 - r)))


def test_kto_matches_hand_computation():
    beta, wd, wu, z0 = 0.5, 1.0, 1.33, 0.8
    rows = [(-10.0, -12.0, True), (-10.0, -9.0, True), (-7.0, -9.5, False), (-6.0, -5.0, False)]
    pi, ref = t(*(r[0] for r in rows)), t(*(r[1] for r in rows))
    desirable = torch.tensor([r[2] for r in rows])
    got = kto_loss(pi, ref, desirable, torch.tensor(z0), beta, wd, wu)
    hand = [kto_hand(p - q, d, z0, beta, wd, wu) for p, q, d in rows]
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)


def test_kto_clamps_and_detaches_its_reference_point():
    pi, ref = t(-3.0, -3.0, grad=True), t(-4.0, -4.0)
    desirable = torch.tensor([True, False])
    kl = torch.tensor(-2.0, requires_grad=True)
    loss = kto_loss(pi, ref, desirable, kl, beta=1.0)
    # a negative KL estimate counts as 0
    hand = [kto_hand(1.0, True, 0.0, 1.0, 1, 1), kto_hand(1.0, False, 0.0, 1.0, 1, 1)]
    assert loss.tolist() == pytest.approx(hand, rel=1e-6)
    loss.sum().backward()
    assert kl.grad is None
    # desirable: d/dr (1 - s(r)) = -s(1 - s); undesirable: d/dr (1 - s(-r)) = s(1 - s)
    s = sigmoid(1.0)
    assert pi.grad.tolist() == pytest.approx([-s * (1 - s), s * (1 - s)], rel=1e-6)


def test_kto_large_margins_are_finite_with_their_gradient():
    pi = t(0.0, -1e4, 0.0, -1e4, grad=True)
    ref = t(-1e4, 0.0, -1e4, 0.0, grad=True)
    desirable = torch.tensor([True, True, False, False])
    loss = kto_loss(pi, ref, desirable, torch.tensor(0.0), beta=1.0)
    assert loss.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0], abs=1e-30)
    assert_finite_with_grad(loss, pi, ref)


def test_kto_reference_point_is_a_clamped_detached_mean():
    pi = t(-10.0, -4.0, -7.0, grad=True)
    z0 = kto_reference_point(pi, t(-11.0, -6.0, -6.0))
    assert z0.shape == () and not z0.requires_grad
    assert z0.item() == pytest.approx((1.0 + 2.0 - 1.0) / 3, rel=1e-6)
    assert kto_reference_point(pi, t(-9.0, -4.0, -5.0)).item() == 0.0  # mean -1, clamped
