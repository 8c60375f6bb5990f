"""Training losses as pure functions: tensors in, tensors out, no state.

Each docstring gives the formula; tests/test_*.py check each against a hand computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that carry loss.

        L = -(1 / |M|) * sum_{t in M} log softmax(z_t)[y_t],   M = {t : y_t != -100}

    logits (B, T, V), targets (B, T). Averaging over the loss tokens, not over rows, weighs a
    long answer by its length, as pretraining does. Computed in float32 (autocast logits are
    bf16 on GPU). With no loss token at all, returns 0 with a gradient (not NaN).
    """
    flat = targets.flatten()
    total = F.cross_entropy(
        logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the targets, and how many tokens it sums.

        s_b = sum_{t in M_b} log softmax(z_{b,t})[y_{b,t}],   n_b = |M_b|,   M_b = {t : y_{b,t} != -100}

    logits (B, T, V), targets (B, T) already shifted (z_t predicts y_t). Returns s (B,) float32
    and n (B,) int64; a row with no loss token gets s = 0, n = 0. Computed in float32 because
    the preference losses below subtract sums of hundreds of log-probs.
    """
    nll = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view_as(targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Reward-model loss on a preference pair (Bradley & Terry 1952; Ouyang et al. 2022).

        L = -log sigmoid(r_c - r_r - m)

    r_chosen, r_rejected (B,) scalar rewards; m a float or (B,) (Llama 2's graded margin,
    Touvron et al. 2023). Returns (B,).
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def _logratio_gap(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor
) -> torch.Tensor:
    """log(pi/ref) of the chosen answer minus that of the rejected one."""
    return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023), conservative form (Mitchell 2023).

        h = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        L = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    pi_*, ref_* (B,) summed log-probs of the chosen/rejected answers under the policy and the
    frozen reference. eps = label_smoothing in [0, 0.5) is the assumed rate of flipped labels;
    eps = 0 is plain DPO. Returns (B,).
    """
    h = beta * _logratio_gap(pi_c, pi_r, ref_c, ref_r)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float = 0.1,
    n_c: torch.Tensor | None = None,
    n_r: torch.Tensor | None = None,
) -> torch.Tensor:
    """Identity Preference Optimization (Azar et al. 2023).

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = (h - 1 / (2 * beta))^2

    pi_*, ref_* (B,) summed log-probs. Given token counts n_c, n_r (B,), each log-ratio is first
    divided by its answer's count, h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r, as TRL does:
    the target gap 1 / (2 beta) is then per token, so it does not depend on answer length.
    Returns (B,).
    """
    if (n_c is None) != (n_r is None):
        raise ValueError("give both token counts n_c and n_r, or neither")
    if n_c is not None:
        pi_c, ref_c, pi_r, ref_r = pi_c / n_c, ref_c / n_c, pi_r / n_r, ref_r / n_r
    return (_logratio_gap(pi_c, pi_r, ref_c, ref_r) - 1 / (2 * beta)) ** 2


def simpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """Simple Preference Optimization (Meng et al. 2024): reference-free, length-normalised.

        L = -log sigmoid(beta * (pi_c / n_c - pi_r / n_r) - gamma)

    pi_* (B,) summed policy log-probs, n_* (B,) their token counts; gamma is the target reward
    margin itself (TRL's simpo_gamma), not gamma / beta. Returns (B,).
    """
    return -F.logsigmoid(beta * (pi_c / n_c - pi_r / n_r) - gamma)


def _log_odds(logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of the mean per-token log-prob a = logp / n: a - log(1 - exp(a))."""
    # At a = 0 (p = 1) log(1 - p) is -inf; capping p at about 1 - 1e-6 keeps the loss and
    # its gradient (which grows like 1/|a|) finite. expm1 keeps 1 - p exact near the cap,
    # where 1 - exp(a) would lose most of its digits in float32.
    a = (logp / n).clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))


def orpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
    nll_c: torch.Tensor,
    lam: float = 0.1,
) -> torch.Tensor:
    """Odds Ratio Preference Optimization (Hong et al. 2024): SFT plus an odds-ratio term.

        a = pi / n,   log odds(a) = a - log(1 - exp(a))
        L = nll_c - lam * log sigmoid(log odds(a_c) - log odds(a_r))

    pi_* (B,) summed policy log-probs, n_* (B,) token counts, nll_c (B,) the chosen answer's
    mean per-token NLL (usually -pi_c / n_c). The mean per-token probability exp(a) is capped
    just below 1. Returns (B,).
    """
    return nll_c - lam * F.logsigmoid(_log_odds(pi_c, n_c) - _log_odds(pi_r, n_r))


def kto_loss(
    pi: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor,
    beta: float = 0.1,
    w_desirable: float = 1.0,
    w_undesirable: float = 1.0,
) -> torch.Tensor:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024), on unpaired examples.

        r = pi - ref,   z0 = max(kl_ref, 0)
        L = w_d * (1 - sigmoid(beta * (r - z0)))   if desirable
        L = w_u * (1 - sigmoid(beta * (z0 - r)))   otherwise

    pi, ref (B,) summed log-probs of the completions, desirable (B,) bool, kl_ref a scalar
    estimate of KL(pi || ref) (see kto_reference_point). z0 is clamped at 0 and detached here,
    whatever the caller passed: the paper uses it as a baseline, not something to train.
    Returns (B,).
    """
    x = beta * (pi - ref - kl_ref.detach().clamp(min=0))
    # 1 - sigmoid(x) = sigmoid(-x), written so to keep its digits when x is large
    return torch.where(desirable, w_desirable * torch.sigmoid(-x), w_undesirable * torch.sigmoid(x))


def kto_reference_point(pi_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): a batch estimate of KL(pi || ref).

        z0 = max(0, mean_b (pi_b - ref_b))

    over mismatched pairs (a prompt with another example's completion), (B,) summed log-probs
    each. Returns a detached scalar.
    """
    return (pi_mismatched - ref_mismatched).mean().clamp(min=0).detach()
