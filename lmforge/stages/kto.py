"""Stage `kto`: Kahneman-Tversky optimisation from unpaired good/bad labels.

    labelled replies (DIR/world/pref_train.jsonl, converted) ──┐
    the SFT model (DIR/sft) ── policy + frozen reference ──────┴─▶ DIR/kto/

Each example is one reply with a label, desirable or not (`data.preferences.read_labelled`:
rankings give their top half as desirable and their bottom half as undesirable). The
implicit reward r = log pi/ref of a desirable reply is pushed above the reference point z0,
an undesirable one below it (`losses.kto_loss`). z0 estimates KL(pi || ref) on the same
batch with mismatched pairs: each prompt with the next example's reply, which the policy
was never asked to prefer (`losses.kto_reference_point`); under torchrun, on each rank's
share of the batch. The weights `kto.w_desirable` and
`kto.w_undesirable` balance the two classes (the paper keeps w_d n_d / (w_u n_u) in
[1, 4/3]). Set-up and figures as for DPO (`stages.dpo.start_policy_stage`,
`finish_policy_stage`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.preferences import (
    collate_completions,
    data_figures,
    encode_completion,
    read_labelled,
)
from lmforge.data.readers import SkipReport
from lmforge.eval.gold import completion_logprobs, summed_logprobs
from lmforge.losses import kto_loss, kto_reference_point
from lmforge.stages.dpo import finish_policy_stage, start_policy_stage
from lmforge.train_utils import (
    console,
    planned_steps,
    train_on_batches,
)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "kto") -> dict:
    """Optimise the SFT model on labelled replies into DIR/<stage>/ and measure it; `resume`
    continues from the newest checkpoint in DIR/<stage>/checkpoints/."""
    kc = cfg.kto
    ps = start_policy_stage(cfg, kc, "kto", run_dir, stage)
    policy, reference, tokenizer = ps.policy, ps.reference, ps.tokenizer
    examples, report = read_labelled(ps.data_path, SkipReport() if kc.skip_bad else None)
    if len(examples) < 2:
        raise ValueError(f"kto: fewer than 2 labelled replies in {ps.data_path}")
    rows = [encode_completion(tokenizer, e.messages, e.completion, ps.max_len) for e in examples]
    desirable = torch.tensor([e.desirable for e in examples])
    ref_logps = torch.tensor(completion_logprobs(reference, rows, tokenizer.pad_id))
    max_steps = planned_steps(kc, len(examples))
    console.print(
        f"kto: {len(examples)} labelled replies ({int(desirable.sum())} desirable) from "
        f"{ps.data_path}; {max_steps} steps x {kc.batch_size} on {ps.d.device}"
    )

    def step(batch: list[int]) -> tuple[torch.Tensor, dict, int, float]:
        x, y = collate_completions([rows[i] for i in batch], tokenizer.pad_id)
        pi, _ = summed_logprobs(policy, x.to(ps.d.device), y.to(ps.d.device))
        # prompt i with the reply of example i + 1: the KL reference point's pairs, a baseline
        # that is not trained through (as in the paper)
        mismatched = [
            encode_completion(tokenizer, examples[i].messages, examples[j].completion, ps.max_len)
            for i, j in zip(batch, batch[1:] + batch[:1])
        ]
        with torch.no_grad():
            mx, my = (t.to(ps.d.device) for t in collate_completions(mismatched, tokenizer.pad_id))
            z0 = kto_reference_point(
                summed_logprobs(policy, mx, my)[0], summed_logprobs(reference, mx, my)[0]
            )
        labels, ref = desirable[batch].to(ps.d.device), ref_logps[batch].to(ps.d.device)
        loss = kto_loss(pi, ref, labels, z0, kc.beta, kc.w_desirable, kc.w_undesirable).mean()
        reward = (pi - ref).detach()
        metrics = {
            "kl_reference_point": round(z0.item(), 4),
            "reward_desirable": round(reward[labels].mean().item(), 4) if labels.any() else None,
            "reward_undesirable": (
                round(reward[~labels].mean().item(), 4) if (~labels).any() else None
            ),
        }
        return loss, metrics, x.numel(), len(batch)

    loss_value = train_on_batches(
        policy, kc, len(examples), cfg.seed, "kto", ps.out, step, ps.d, resume, ps.expect
    )
    if not ps.d.is_main:  # under torchrun, rank 0 saves and measures
        return {}
    summary = {
        "train_loss": round(loss_value, 6),
        "examples": len(examples),
        **data_figures(report),
        "steps": max_steps,
    }
    return finish_policy_stage(ps, kc, run_dir, cfg.seed, summary)
