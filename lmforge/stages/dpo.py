"""Stage `dpo`: preference optimisation straight from comparisons, no reward model.

    comparisons (DIR/world/pref_train.jsonl) ──┐
    the SFT model (DIR/sft) ── policy + frozen reference ─▶ DIR/dpo/ (model, summary.json)

The policy starts as the SFT model and the reference stays it. Every pair (rankings give all
their pairs, each ranking weighing 1 in total; `dpo.pairs="best_worst"` keeps only its best
against its worst) is scored by the summed log-probability of each reply, and the loss is
one of `lmforge.losses` (`dpo.loss`):

- `dpo`: -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)), with conservative
  label smoothing `dpo.label_smoothing`;
- `ipo`: (log-ratio gap - 1 / (2 beta))^2, per token;
- `simpo`: reference-free, length-normalised, with margin `dpo.simpo_gamma`;
- `orpo`: SFT loss on the chosen reply plus an odds-ratio term, reference-free.

The reference's log-probabilities never change, so they are computed once, before training.
Figures: the training metrics (reward accuracy and margin of the implicit reward
beta * log pi/ref, chosen and rejected log-probabilities) in metrics.jsonl; on held-out
prompts, the gold win rate against the SFT model and the KL divergence from it
(`eval.gold.compare_to_reference`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmforge.config import PolicyTraining, RunConfig
from lmforge.data.preferences import (
    Pair,
    collate_completions,
    data_figures,
    encode_completion,
    read_pairs,
)
from lmforge.data.readers import SkipReport
from lmforge.eval.gold import compare_to_reference, completion_logprobs, summed_logprobs
from lmforge.io import load_model_dir, sha256_file
from lmforge.losses import dpo_loss, ipo_loss, orpo_loss, simpo_loss
from lmforge.model import Transformer
from lmforge.runs import Timer, find_input, find_model_dir, stage_dir, write_summary
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import (
    Dist,
    MetricsLog,
    console,
    finish_training,
    planned_steps,
    setup_device,
    train_on_batches,
)

REFERENCE_FREE = ("simpo", "orpo")
# the SFT model's own replies ranked by annotators (written by `rm`), else the world's
# written comparisons: pairs of replies the policy would not write move it in odd directions
PREFERENCE_DATA = ["rm/policy_rankings.jsonl", "world/pref_train.jsonl"]


def best_worst(pairs: list[Pair]) -> list[Pair]:
    """Of each record's pairs, the one of its best reply against its worst (weight 1): the
    reply chosen most often net of being rejected, against the one rejected most. (A ranking
    that holds one text twice has lost the pairs between the copies, so no reply need be
    chosen in every pair it is in.)"""
    by_record: dict[str, list[Pair]] = {}
    for p in pairs:
        by_record.setdefault(p.where, []).append(p)
    kept = []
    for group in by_record.values():
        net: dict[str, int] = {}
        for p in group:
            net[p.chosen] = net.get(p.chosen, 0) + 1
            net[p.rejected] = net.get(p.rejected, 0) - 1
        pair = max(group, key=lambda p: net[p.chosen] - net[p.rejected])
        kept.append(replace(pair, weight=1.0))
    return kept


def preference_loss(
    kind: str,
    dc,
    pi: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    n: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per-pair loss (B,) of variant `kind` from summed log-probs (chosen, rejected)."""
    (pi_c, pi_r), (ref_c, ref_r), (n_c, n_r) = pi, ref, n
    if kind == "dpo":
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, dc.beta, dc.label_smoothing)
    if kind == "ipo":
        return ipo_loss(pi_c, pi_r, ref_c, ref_r, dc.beta, n_c, n_r)
    if kind == "simpo":
        return simpo_loss(pi_c, pi_r, n_c, n_r, dc.simpo_beta, dc.simpo_gamma)
    return orpo_loss(pi_c, pi_r, n_c, n_r, -pi_c / n_c, dc.orpo_lambda)


@dataclass
class PolicyStage:
    """What DPO and KTO set up alike: the policy (the SFT model) and its frozen copy, the
    reference, with their tokenizer, device, stage directory and training data."""

    name: str
    timer: Timer
    d: Dist
    out: Path
    policy: Transformer
    reference: Transformer
    tokenizer: Tokenizer
    base_dir: Path
    max_len: int
    data_path: Path
    expect: dict  # what a checkpoint to resume from must have been written with


def start_policy_stage(
    cfg: RunConfig, section: PolicyTraining, name: str, run_dir: Path, stage: str
) -> PolicyStage:
    """The policy is `<name>.model`, else the run's SFT model, else its pretrained one; the
    data `<name>.data`, else `PREFERENCE_DATA`."""
    timer = Timer()
    d = setup_device(section.device, section.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage, cfg)
    base_dir = find_model_dir(run_dir, section.model, f"{name}.model", ["sft", "pretrain"])
    policy, tokenizer = load_model_dir(base_dir, d.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    data_path = find_input(run_dir, section.data, f"{name}.data", PREFERENCE_DATA)
    max_len = min(section.max_len, policy.cfg.max_seq_len)
    expect = {"base_model_sha256": sha256_file(base_dir / "model.safetensors")}
    return PolicyStage(
        name, timer, d, out, policy, reference, tokenizer, base_dir, max_len, data_path, expect
    )


def finish_policy_stage(
    ps: PolicyStage, section: PolicyTraining, run_dir: Path, seed: int, summary: dict
) -> dict:
    """Save the trained policy and its loss curve, add the gold comparison with the SFT
    model on the world's held-out prompts (`eval.gold.compare_to_reference`; none without
    them), and write the summary."""
    finish_training(ps.out, ps.policy, ps.tokenizer, MetricsLog(ps.out / "metrics.jsonl"), ps.name)
    summary["base_model"] = str(ps.base_dir)
    world_eval = Path(run_dir) / "world" / "pref_eval.jsonl"
    if world_eval.exists():
        held = [json.loads(line) for line in world_eval.open(encoding="utf-8")]
        summary |= compare_to_reference(
            ps.policy,
            ps.reference,
            ps.tokenizer,
            held,
            section.max_new_tokens,
            section.kl_prompts,
            seed,
            section.eval_samples,
        )
    console.print(f"{ps.name}: {json.dumps(summary)}")
    summary.update(seconds=ps.timer.seconds, device=f"{ps.d.device.type} x {ps.d.world_size}")
    return write_summary(ps.out, summary)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "dpo") -> dict:
    """Optimise the SFT model on preference pairs into DIR/<stage>/ and measure it; `resume`
    continues from the newest checkpoint in DIR/<stage>/checkpoints/."""
    dc = cfg.dpo
    ps = start_policy_stage(cfg, dc, "dpo", run_dir, stage)
    policy, reference, tokenizer = ps.policy, ps.reference, ps.tokenizer
    pairs, report = read_pairs(ps.data_path, SkipReport() if dc.skip_bad else None)
    if dc.pairs == "best_worst":
        pairs = best_worst(pairs)
    if not pairs:
        raise ValueError(f"dpo: no training pairs in {ps.data_path}")
    rows = [
        encode_completion(tokenizer, p.messages, text, ps.max_len)
        for p in pairs
        for text in (p.chosen, p.rejected)
    ]
    # the reference's log-probabilities, once: (chosen, rejected) per pair
    ref_logps = (
        torch.zeros(len(pairs), 2)
        if dc.loss in REFERENCE_FREE
        else torch.tensor(completion_logprobs(reference, rows, tokenizer.pad_id)).view(-1, 2)
    )
    max_steps = planned_steps(dc, len(pairs))
    console.print(
        f"dpo: {dc.loss} on {len(pairs)} pairs from {ps.data_path} ({dc.pairs}); "
        f"{max_steps} steps x {dc.batch_size} pairs on {ps.d.device}"
    )

    def step(batch: list[int]) -> tuple[torch.Tensor, dict, int, float]:
        x, y = collate_completions(
            [rows[2 * i + k] for i in batch for k in (0, 1)], tokenizer.pad_id
        )
        logps, counts = summed_logprobs(policy, x.to(ps.d.device), y.to(ps.d.device))
        pi, n = logps.view(-1, 2).unbind(1), counts.view(-1, 2).unbind(1)
        ref = ref_logps[batch].to(ps.d.device).unbind(1)
        weights = torch.tensor([pairs[i].weight for i in batch], device=ps.d.device)
        loss = (weights * preference_loss(dc.loss, dc, pi, ref, n)).sum() / weights.sum()
        with torch.no_grad():  # the implicit reward beta * log pi/ref, whatever the loss
            margin = dc.beta * ((pi[0] - ref[0]) - (pi[1] - ref[1]))
        metrics = {
            "reward_accuracy": round((margin > 0).float().mean().item(), 4),
            "reward_margin": round(margin.mean().item(), 4),
            "logp_chosen": round(pi[0].mean().item(), 4),
            "logp_rejected": round(pi[1].mean().item(), 4),
        }
        return loss, metrics, x.numel(), weights.sum().item()

    loss_value = train_on_batches(
        policy, dc, len(pairs), cfg.seed, "dpo", ps.out, step, ps.d, resume, ps.expect
    )
    if not ps.d.is_main:  # under torchrun, rank 0 saves and measures
        return {}
    records = MetricsLog(ps.out / "metrics.jsonl").read()
    last = records[-min(len(records), math.ceil(len(pairs) / dc.batch_size)) :]  # last epoch
    summary = {
        "loss_name": dc.loss,
        "train_loss": round(loss_value, 6),
        "reward_accuracy": round(sum(r["reward_accuracy"] for r in last) / len(last), 4),
        "reward_margin": round(sum(r["reward_margin"] for r in last) / len(last), 4),
        "pairs": len(pairs),
        **data_figures(report),
        "steps": max_steps,
    }
    return finish_policy_stage(ps, dc, run_dir, cfg.seed, summary)
