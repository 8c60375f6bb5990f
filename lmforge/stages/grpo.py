"""Stage `grpo`: group-relative policy optimisation with verifiable rewards.

    word problems (DIR/world/rl_train.jsonl) ──┐
    the SFT model (DIR/sft) ── policy ─────────┴─▶ DIR/grpo/ (model, summary.json)

Each step draws `prompts_per_step` prompts (in shuffled passes over them, or with
`curriculum_key` by category, from a bandit that favours the categories whose groups teach
most: `curriculum.CategoryCurriculum`) and samples `group_size` replies to each at
temperature 1 (`rollout.rollout`, log-probs kept from the same pass). Each reply gets a reward
(`rewards`: by default 1 if its final answer is right), and its advantage is its reward
against its group's (`losses.group_advantages`, or `rloo_advantages`; without the division by
the group's std this is Dr. GRPO). With `step_credit` > 0 the tokens that write a worked
step's result ("48 + 30 = 78.") also get that weight times the step's truth against the
group's rate of true steps (`losses.step_credit`): the answer's reward says that a reply went
wrong, this says where. A group whose rewards (and step truths) are all equal carries no
signal and is skipped (counted). The policy then takes `iterations` passes of `minibatches`
optimiser steps over the batch, with the clipped importance ratio against the sampling policy
(`losses.clipped_policy_loss`) and, with `kl_coef` > 0, the k3 KL to the frozen SFT model,
aggregated per token, per reply or by a constant (`losses.masked_mean`).

Under torchrun each rank samples its slice of a step's prompts, each reply with its own
seed (`rollout.reply_seeds`), and the update takes the steps one process takes on the whole
batch (`rollout.update_passes`): the same random numbers, so the same replies up to
floating-point differences in the logits, and the same steps.

Every `checkpoint_every` steps the policy, the optimiser and the elapsed training time are
checkpointed (DIR/<stage>/checkpoints/); `resume=True` continues from the newest one exactly,
since a step's prompts and samples are functions of (seed, step).

With `average_decay` > 0 the stage's model is a moving average of the policy's weights over
the steps (`train_utils.WeightAverage`, checkpointed with it): the policy samples and learns
as ever, and the average is what is evaluated after and written out.

Figures: greedy accuracy on held-out problems before and after (`arith_accuracy_before`,
`arith_accuracy`: world/sft_eval_arithmetic.jsonl, none of which is trained on; with an
average, also the last weights' `arith_accuracy_last_weights`; with a curriculum, per
category too, and the categories' final values and shares drawn), and per
step in metrics.jsonl: reward, accuracy of the samples, skipped groups, clip fraction,
KL, entropy, reply length, truncations, rollout and training seconds.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, GRPOConfig, RunConfig
from lmforge.curriculum import CategoryCurriculum
from lmforge.data.prompts import read_prompts
from lmforge.data.readers import SkipReport
from lmforge.eval.chat import answered_right
from lmforge.eval.gold import spread
from lmforge.io import load_model_dir, sha256_file
from lmforge.losses import (
    IGNORE_INDEX,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    masked_mean,
    rloo_advantages,
    step_credit,
)
from lmforge.model import Transformer
from lmforge.rewards import BatchReward, build_reward, step_results, verifiable_reward
from lmforge.rollout import (
    RankRows,
    Rollout,
    check_prompt_split,
    checkpoint_step,
    fitting,
    my_prompts,
    rank_rows,
    reply_batch,
    reply_logprobs,
    reply_seeds,
    rl_steps,
    rollout,
    training_matmuls,
    update_passes,
)
from lmforge.runs import Timer, find_input, find_model_dir, stage_dir, write_summary
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import (
    Dist,
    TrainingProgress,
    WeightAverage,
    all_reduce_sums,
    build_optimizer,
    console,
    finish_training,
    setup_device,
    start_log,
)


def advantages(rewards: torch.Tensor, gc: GRPOConfig) -> torch.Tensor:
    """(P, G) advantages of (P, G) rewards, as `grpo.advantage` and `grpo.scale_std` say."""
    if gc.advantage == "rloo":
        return rloo_advantages(rewards)
    return group_advantages(rewards, scale=gc.scale_std)


def step_result_tokens(
    tokenizer: Tokenizer, rollouts: list[Rollout]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which reply tokens spell a worked step's result (`rewards.step_results`), and whether
    that step holds: (truth, is_result), each (N, T) bool over the rollouts' tokens, T the
    longest reply. A token that spans a result only in part counts as spelling it; a reply
    that stops right after a result ends that number with its end token, which counts too."""
    width = max(len(r.tokens) for r in rollouts)
    truth = torch.zeros(len(rollouts), width, dtype=torch.bool)
    is_result = torch.zeros(len(rollouts), width, dtype=torch.bool)
    for n, r in enumerate(rollouts):
        pieces = [tokenizer.decode_bytes([t]) for t in r.tokens]
        starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))  # byte offsets
        # bytes that are not UTF-8 stay one character each, so characters map back to bytes
        text = b"".join(pieces).decode("utf-8", "surrogateescape")
        char_starts = list(
            itertools.accumulate(
                (len(c.encode("utf-8", "surrogateescape")) for c in text), initial=0
            )
        )
        for begin, end, holds in step_results(text):
            first = bisect.bisect_right(starts, char_starts[begin]) - 1
            last = bisect.bisect_left(starts, char_starts[end]) - 1
            is_result[n, first : last + 1] = True
            truth[n, first : last + 1] = holds
    return truth, is_result


def held_out_accuracy(
    policy: Transformer,
    tokenizer: Tokenizer,
    held: list[dict],
    max_new_tokens: int,
    d: Dist,
    key: str = "kind",
) -> tuple[float, dict[str, float]]:
    """The share of `held` answered right, greedy, and where every record has a `key` (a
    category: the world's kind of word problem) the share within each category; under
    torchrun each rank answers every world_size-th prompt."""
    mine = held[d.rank :: d.world_size]
    right = answered_right(policy, tokenizer, mine, max_new_tokens)
    kinds = sorted({str(r[key]) for r in held}) if all(key in r for r in held) else []
    rights = [sum(ok for r, ok in zip(mine, right) if str(r[key]) == k) for k in kinds]
    totals = all_reduce_sums([sum(right), *rights], d)
    sizes = [sum(str(r[key]) == k for r in held) for k in kinds]
    by_kind = {k: round(n_right / n, 4) for k, n_right, n in zip(kinds, totals[1:], sizes)}
    return round(totals[0] / len(held), 4), by_kind


def policy_update(
    policy: Transformer,
    reference: Transformer | None,
    optimizer: torch.optim.Optimizer,
    rollouts: list[Rollout],
    adv: torch.Tensor,
    gc: GRPOConfig,
    pad_id: int,
    device: torch.device,
    d: Dist | None = None,
    rows: RankRows | None = None,
) -> dict[str, float]:
    """`gc.iterations` passes of `gc.minibatches` optimiser steps over the first B rollouts,
    each with its advantage adv (B,); returns the loss, clip fraction, KL and entropy
    averaged over the steps.

    Under torchrun (`d`) they sit in the whole batch where `rows` says, and the steps are the
    ones a single process takes on the whole batch (`rollout.update_passes`). A rank with nothing
    to learn from (B = 0) still passes one rollout, through which it computes its share of
    zero."""
    rows = rows or RankRows()
    batch = reply_batch(rollouts, pad_id, rows.width).to(device)
    mask = batch.targets != IGNORE_INDEX
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref, _ = reply_logprobs(reference, batch, None, gc.temperature)
    n_rows = len(adv)
    adv = (adv if n_rows else torch.zeros(1)).to(device)
    # (B or 1, 1) per reply, or (B, T) per token, padded to the batch's replies
    adv = adv[:, None] if adv.dim() == 1 else F.pad(adv, (0, mask.size(1) - adv.size(1)))

    def step_loss(mine: list[int], _: int) -> tuple[torch.Tensor, dict[str, float], float]:
        # no row of this minibatch here: a loss of weight 0 through every parameter
        mb = mine or [0]
        logp, entropy = reply_logprobs(policy, batch, mb, gc.temperature, with_entropy=True)
        per_token, clipped = clipped_policy_loss(logp, batch.old[mb], adv[mb], gc.clip_eps)
        kl = k3_kl(logp, ref[mb]) if ref is not None else torch.zeros_like(logp)
        loss = masked_mean(per_token + gc.kl_coef * kl, mask[mb], gc.loss_level)
        with torch.no_grad():
            figures = {
                "clip_fraction": masked_mean(clipped, mask[mb]).item(),
                "kl": masked_mean(kl, mask[mb]).item(),
                "entropy": masked_mean(entropy, mask[mb]).item(),
            }
        weight = float(mask[mine].sum()) if gc.loss_level == "token" else float(len(mine))
        return loss, figures, weight

    policy.train()
    return update_passes(
        list(policy.parameters()),
        optimizer,
        n_rows,
        gc.iterations,
        gc.minibatches,
        gc.grad_clip,
        step_loss,
        d,
        rows.offset,
        rows.total,
    )


@dataclass
class GRPOStep:
    """What one step did: its rollouts and their rewards (after the truncation penalty),
    right answers and truncations, the groups skipped as all-equal, each group's mean absolute
    advantage (what the curriculum learns from), the update's figures (empty when nothing was
    learned from), and the seconds spent sampling and scoring (`rollout_seconds`) and
    updating (`train_seconds`)."""

    rollouts: list[Rollout]
    rewards: torch.Tensor  # (N,)
    correct: list[float]
    truncated: torch.Tensor  # (N,) bool
    skipped_groups: int
    abs_advantage: list[float]  # per group
    update: dict[str, float]
    rollout_seconds: float
    train_seconds: float


def grpo_step(
    policy: Transformer,
    reference: Transformer | None,
    optimizer: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    records: list[dict],
    indices: list[int],
    reward: BatchReward,
    gc: GRPOConfig,
    seeds: list[int],
    d: Dist | None = None,
) -> GRPOStep:
    """One GRPO step on records[i] for i in `indices` (under torchrun, this rank's share of
    the step's prompts; every rank takes every step, whose update sums gradients over the
    ranks): sample `gc.group_size` replies to each (one seed per reply), reward them, and
    update the policy on the replies of the groups whose rewards differ."""
    d = d or Dist()
    t0 = time.perf_counter()
    rolls = rollout(
        policy,
        tokenizer,
        records,
        indices,
        gc.group_size,
        gc.max_new_tokens,
        gc.temperature,
        seed=seeds,
    )
    rewards = reward([records[r.record] for r in rolls], [r.text for r in rolls])
    correct = [verifiable_reward(records[r.record], r.text) for r in rolls]
    truncated = torch.tensor([r.truncated for r in rolls])
    if gc.truncated == "penalty":
        rewards = torch.where(truncated, gc.truncation_reward, rewards)
    grid = rewards.view(len(indices), gc.group_size)
    informative = grid.max(1).values > grid.min(1).values  # (P,)
    grid_adv = advantages(grid, gc)
    adv = grid_adv.flatten()
    if gc.step_credit:
        credit = step_credit(*step_result_tokens(tokenizer, rolls), gc.group_size)
        adv = adv[:, None] + gc.step_credit * credit  # (N, T)
        informative |= credit.view(len(indices), -1).ne(0).any(1)
    informative = informative.repeat_interleave(gc.group_size)
    learn = informative & ~truncated if gc.truncated == "exclude" else informative
    t1 = time.perf_counter()
    chosen = [r for r, k in zip(rolls, learn.tolist()) if k]
    rows = rank_rows(chosen, d)
    update = {}
    if rows.total:
        update = policy_update(
            policy,
            reference,
            optimizer,
            chosen or rolls[:1],
            adv[learn],
            gc,
            tokenizer.pad_id,
            d.device,
            d,
            rows,
        )
    skipped = len(indices) - int(informative.sum()) // gc.group_size
    return GRPOStep(
        rolls,
        rewards,
        correct,
        truncated,
        skipped,
        grid_adv.abs().mean(1).tolist(),
        update,
        t1 - t0,
        time.perf_counter() - t1,
    )


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "grpo") -> dict:
    """Train the SFT model with GRPO into DIR/<stage>/ and measure held-out accuracy;
    `resume` continues from the newest checkpoint in DIR/<stage>/checkpoints/."""
    gc = cfg.grpo
    timer = Timer()
    check_prompt_split("grpo", gc)
    d = setup_device(gc.device, gc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage, cfg)
    base_dir = find_model_dir(run_dir, gc.model, "grpo.model", ["sft", "pretrain"])
    policy, tokenizer = load_model_dir(base_dir, d.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if gc.kl_coef > 0 else None
    skips = SkipReport() if gc.skip_bad else None
    data_path = find_input(run_dir, gc.data, "grpo.data", ["world/rl_train.jsonl"])
    eval_path = find_input(
        run_dir, gc.eval_data, "grpo.eval_data", ["world/sft_eval_arithmetic.jsonl"]
    )
    prompts = read_prompts(data_path, skips)
    if "reference_steps" in gc.rewards:
        missing = sum("step_results" not in r for r in prompts)
        if missing:
            raise ConfigError(
                f"grpo.rewards: 'reference_steps' needs each prompt's 'step_results', and "
                f"{missing} of the {len(prompts)} prompts in {data_path} have none"
            )
    records, too_long = fitting(prompts, tokenizer, policy, gc.max_new_tokens)
    eval_tokens = gc.eval_max_new_tokens or gc.max_new_tokens
    held, held_too_long = fitting(read_prompts(eval_path, skips), tokenizer, policy, eval_tokens)
    if not records or not held:
        empty, budget = (data_path, gc.max_new_tokens) if not records else (eval_path, eval_tokens)
        raise ValueError(f"grpo: no prompt in {empty} leaves {budget} new tokens in the context")
    if gc.eval_prompts:
        held = spread(held, gc.eval_prompts)
    curriculum = None
    if gc.curriculum_key:
        missing = sum(gc.curriculum_key not in r for r in records)
        if missing:
            raise ConfigError(
                f"grpo.curriculum_key: {missing} of the {len(records)} prompts in {data_path} "
                f"have no {gc.curriculum_key!r} (set grpo.curriculum_key=null to draw uniformly)"
            )
        curriculum = CategoryCurriculum(
            [str(r[gc.curriculum_key]) for r in records],
            gc.curriculum_temperature,
            gc.curriculum_rate,
            cfg.seed,
        )
    reward = build_reward(gc, "grpo", run_dir, policy, tokenizer, d.device)
    key = gc.curriculum_key or "kind"
    before, before_by_kind = held_out_accuracy(policy, tokenizer, held, eval_tokens, d, key)
    if d.is_main:
        console.print(
            f"grpo: {len(records)} prompts from {data_path}; {gc.steps} steps x "
            f"{gc.prompts_per_step} prompts x {gc.group_size} samples on {d.device} x "
            f"{d.world_size}; held-out accuracy before: {before}"
        )

    optimizer = build_optimizer(policy, gc.lr, gc.weight_decay, (gc.beta1, gc.beta2))
    average = WeightAverage(policy, gc.average_decay) if gc.average_decay else None
    kept = {}  # checkpointed too
    if average is not None:
        kept["average"] = average.tensors
    if curriculum is not None:
        kept["curriculum"] = curriculum.tensors
    # a checkpoint resumes only the run it came from: same batch shape, same starting model
    expect = {
        "prompts_per_step": gc.prompts_per_step,
        "group_size": gc.group_size,
        "base_model_sha256": sha256_file(base_dir / "model.safetensors"),
        "average_decay": gc.average_decay,
        "curriculum": [gc.curriculum_key, gc.curriculum_temperature, gc.curriculum_rate]
        if curriculum
        else None,
    }
    log, batches, state = start_log(
        out,
        len(records),
        gc.prompts_per_step,
        cfg.seed,
        policy,
        optimizer,
        expect,
        resume,
        "grpo",
        d.is_main,
        kept,
    )
    mine = my_prompts(gc.prompts_per_step, d)
    generated = 0
    start = time.perf_counter()
    elapsed_before = state.get("elapsed_seconds", 0.0)
    with (
        TrainingProgress(gc.steps, "grpo", enabled=d.is_main) as progress,
        training_matmuls(gc, d, policy, reference),
    ):
        for step, lr in rl_steps(gc, optimizer, state["step"], elapsed_before, d):
            drawn = curriculum.draw(step, gc.prompts_per_step) if curriculum else next(batches)
            indices = drawn[mine]
            first_row = mine.start * gc.group_size
            seeds = reply_seeds(cfg.seed, step, first_row, len(indices) * gc.group_size)
            result = grpo_step(
                policy, reference, optimizer, tokenizer, records, indices, reward, gc, seeds, d
            )
            if average is not None:
                average.update()
            if curriculum is not None:
                shares = curriculum.probabilities()  # what drew this step's prompts
                curriculum.update(
                    all_reduce_sums(curriculum.arm_sums(indices, result.abs_advantage), d)
                )
            rolls = result.rollouts
            totals = [
                result.rewards.sum().item(),
                sum(result.correct),
                result.skipped_groups,
                result.truncated.sum().item(),
                sum(len(r.tokens) for r in rolls),
            ]
            rewarded, right, skipped, cut, tokens = all_reduce_sums(totals, d)
            n = gc.prompts_per_step * gc.group_size
            record = {
                "step": step,
                "loss": result.update.get("loss", 0.0),
                "reward": round(rewarded / n, 4),
                "sample_accuracy": round(right / n, 4),
                "skipped_groups": int(skipped),
                "truncated": round(cut / n, 4),
                "reply_tokens": round(tokens / n, 2),
                **{k: v for k, v in result.update.items() if k != "loss"},
                **(
                    {"curriculum": dict(zip(curriculum.arms, (round(p, 3) for p in shares)))}
                    if curriculum
                    else {}
                ),
                "rollout_seconds": round(result.rollout_seconds, 3),
                "train_seconds": round(result.train_seconds, 3),
                "lr": lr,
            }
            log.write(**record)
            elapsed = elapsed_before + time.perf_counter() - start
            saved = {**expect, "elapsed_seconds": round(elapsed, 3)}
            checkpoint_step(out, step, policy, optimizer, gc, saved, d, kept)
            generated += tokens
            tok_s = generated / (time.perf_counter() - start)  # sampled tokens
            progress.update(step, loss=record["loss"], tok_s=tok_s)

    last_weights = {}
    if average is not None:
        last_weights["arith_accuracy_last_weights"] = held_out_accuracy(
            policy, tokenizer, held, eval_tokens, d
        )[0]
        average.copy_to_model()
    if d.is_main:
        finish_training(out, policy, tokenizer, log, "grpo")
    after, after_by_kind = held_out_accuracy(policy, tokenizer, held, eval_tokens, d, key)
    if not d.is_main:
        return {}
    history = log.read()  # the whole run's, across resumes
    first, last = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10) :]
    steps_done = history[-1]["step"] if history else 0
    summary = {
        "arith_accuracy": after,
        "arith_accuracy_before": before,
        **last_weights,
        **({"arith_accuracy_by_kind": after_by_kind} if after_by_kind else {}),
        **({"arith_accuracy_by_kind_before": before_by_kind} if before_by_kind else {}),
        **({"curriculum": curriculum.summary()} if curriculum else {}),
        "eval_prompts": len(held),
        "eval_data": str(eval_path),
        "base_model": str(base_dir),
        "steps": steps_done,
        "samples": steps_done * gc.prompts_per_step * gc.group_size,
        "sample_accuracy_first": round(sum(r["sample_accuracy"] for r in first) / len(first), 4),
        "sample_accuracy_last": round(sum(r["sample_accuracy"] for r in last) / len(last), 4),
        "skipped_groups": sum(r["skipped_groups"] for r in history),
        "groups": steps_done * gc.prompts_per_step,
        "rollout_seconds": round(sum(r["rollout_seconds"] for r in history), 1),
        "train_seconds": round(sum(r["train_seconds"] for r in history), 1),
        "data_skipped": len(skips.skipped) if skips else 0,
        "prompts_too_long": too_long,
        "eval_prompts_too_long": held_too_long,
    }
    console.print(f"grpo: {summary}")
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x {d.world_size}")
    return write_summary(out, summary)
