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

    logits (B, T, V) and targets (B, T), or the logits (N, V) at N positions and their targets
    (N,) (`Transformer.logits_at`). Averaging over the loss tokens, not over rows, weighs a
    long answer by its length, as pretraining does. Computed in float32 (autocast logits are
    bf16 on GPU). With no loss token at all, returns 0 with a gradient (not NaN).
    """
    flat = targets.flatten()
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        flat,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(z_i)[y_i] for each of N positions: logits (N, V), targets (N,); float32."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the targets, and how many tokens it sums.

        s_b = sum_{t in M_b} log softmax(z_{b,t})[y_{b,t}],   n_b = |M_b|,   M_b = {t : y_{b,t} != -100}

    targets (B, T) already shifted (z_t predicts y_t); logits (N, V) only at the N positions
    of M, in row-major order (`Transformer.logits_at`). Returns s (B,) float32 and n (B,)
    int64; a row with no loss token gets s = 0, n = 0. Computed in float32 because the
    preference losses below subtract sums of hundreds of log-probs.
    """
    wanted = targets != IGNORE_INDEX
    logp = token_logprobs(logits, targets[wanted])
    # laid back out (B, T) and summed along each row: the same order every run, on a GPU too
    s = logp.new_zeros(targets.shape).masked_scatter(wanted, logp).sum(-1)
    return s, wanted.sum(-1)


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


# ---- online RL: advantages and policy-gradient losses -----------------------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024), G samples per prompt.

        A_{p,i} = (r_{p,i} - mean_j r_{p,j}) / (std_j r_{p,j} + eps)   if scale
        A_{p,i} =  r_{p,i} - mean_j r_{p,j}                            otherwise (Dr. GRPO)

    rewards (P, G); the standard deviation is the population one (unbiased=False). Dr. GRPO
    (Liu et al. 2025) drops the division: it up-weights groups where the rewards barely
    differ, i.e. questions that are nearly always or nearly never solved. Returns (P, G).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024), G >= 2 per prompt.

        A_{p,i} = r_{p,i} - (1 / (G - 1)) * sum_{j != i} r_{p,j} = G / (G - 1) * (r_{p,i} - mean_j r_{p,j})

    rewards (P, G). The baseline excludes the sample itself, so it is unbiased. Returns (P, G).
    """
    g = rewards.size(1)
    if g < 2:
        raise ValueError("rloo_advantages: needs at least 2 samples per prompt")
    return g / (g - 1) * (rewards - rewards.mean(dim=1, keepdim=True))


def step_credit(truth: torch.Tensor, is_result: torch.Tensor, group_size: int) -> torch.Tensor:
    """Token-level credit for the results of worked steps ("48 + 30 = 78"), against the
    group's rate of true ones: a dense, verifiable reward that says which step went wrong,
    where the answer's reward says only that something did.

        c_{i,t} = tau_{i,t} - mean_{j in group(i), s in R_j} tau_{j,s}    if t in R_i
        c_{i,t} = 0                                                       otherwise

    R_i are the tokens that write reply i's step results with the character ending each
    (`rewards.step_results`), tau 1 on those of a true step and 0 on a false one. truth and
    is_result (B, T), B = P * group_size replies grouped by prompt. Returns (B, T); a group
    with no step result gets 0.
    """
    truth = truth.float() * is_result
    result = is_result.float()
    width = truth.size(1)
    totals = truth.view(-1, group_size * width).sum(1)  # (P,)
    counts = result.view(-1, group_size * width).sum(1)
    rate = (totals / counts.clamp(min=1)).repeat_interleave(group_size)[:, None]  # (B, 1)
    return (truth - rate) * result


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token.

        rho_t = exp(logp_t - old_logp_t)
        L_t = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)

    logp (B, T) under the policy being trained, old_logp (B, T) under the policy that sampled
    the tokens (no gradient), advantages broadcastable to (B, T). Returns the per-token loss
    (B, T) and a (B, T) float mask of the tokens where the clip was active (for the clip
    fraction); aggregate with `masked_mean`.
    """
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token, >= 0 and unbiased.

        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    logp, ref_logp (B, T) log-probs of tokens sampled from pi. Returns (B, T).
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """Aggregate per-token values (B, T) over the tokens where mask (B, T) is 1.

        token:    sum_{b,t} m v / sum_{b,t} m                (every token weighs the same)
        sequence: mean_b [ sum_t m v / sum_t m ]             (every reply weighs the same)
        constant: sum_{b,t} m v / (B * T)                    (Dr. GRPO: no length bias)

    GRPO's paper averages per sequence, which lets a long wrong reply off lightly; DAPO and
    Dr. GRPO weigh tokens. A row without a masked token contributes 0.
    """
    mask = mask.float()
    if level == "token":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if level == "sequence":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if level == "constant":
        return (values * mask).sum() / mask.numel()
    raise ValueError(f"masked_mean: level must be token, sequence or constant, not {level!r}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each reply's tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after a reply's last token is 0)
        A_t = sum_{l >= 0} (gamma * lam)^l * delta_{t+l},   R_t = A_t + V_t

    rewards, values, mask (B, T), mask 1 on the reply's tokens (a contiguous span per row);
    rewards are per token (PPO's: -beta * KL at each token, the score added at the last).
    Returns advantages and returns (B, T), 0 off the mask; no gradient flows.
    """
    mask = mask.float()
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """PPO's value loss with the value clipped around the rollout's estimate, per token.

        L_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2)

    values (B, T) from the critic being trained, old_values and returns (B, T) fixed.
    Returns (B, T); aggregate with `masked_mean`.
    """
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
