"""Stage `ppo`: proximal policy optimisation against the reward model, on a KL leash.

    prompts (DIR/world/pref_train.jsonl) ──┐
    the reward model (DIR/rm/model) ───────┤
    the SFT model (DIR/sft) ── policy + value head, frozen reference ─▶ DIR/ppo/

Each step samples one reply to each of `prompts_per_step` prompts (`rollout.rollout`), scores
it with `ppo.rewards` (by default the reward model alone, normalised by the reward statistics
`rm` stored; any weighted mix of `lmforge.rewards`' sources: the AI judge, Llama 2's
safety/helpfulness rule, rules), clipped to +-`reward_clip` (a truncated reply can get
`truncation_reward` instead), and gives every reply token the reward

    r_t = -beta * (log pi(y_t) - log ref(y_t))   (+ the score at the reply's last token)

so the return is the score minus beta times the reply's KL to the SFT model (Ziegler et al.
2019; Ouyang et al. 2022). A value head on the policy's final hidden states (detached: it does
not train the policy's trunk) estimates the return; advantages come from GAE (`losses.gae`, gamma, lambda), whitened over the batch. The
policy then takes `iterations` passes of `minibatches` optimiser steps with the clipped
surrogate (`losses.clipped_policy_loss`) plus `vf_coef` times the clipped value loss
(`losses.clipped_value_loss`). With `kl_target` > 0, beta follows an adaptive controller:
beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * replies / horizon. With `ptx_coef` > 0 the
pretraining loss on `ptx_rows` windows of pretraining text is added to each step (PPO-ptx:
objective = E[r - beta log pi/pi_SFT] + ptx_coef * E_pretrain[log pi]).

Under torchrun each rank samples its slice of a step's prompts, each reply with its own seed
(`rollout.reply_seeds`); the whitening, the KL (and so beta) and the explained variance are
taken over every rank's replies, and each optimiser step is the one process's
(`rollout.update_passes`; every rank adds the same pretraining windows, counted once).
Every rank scores its share of the held-out pretraining windows; rank 0 alone probes, saves
and measures the gold figures.

Figures: `gold_score` / `gold_score_before` (mean gold score of the policy's and the SFT
model's sampled replies to held-out prompts, `eval.gold.compare_to_reference`, with win rates
and `kl_to_ref`), `pretrain_loss_delta` (held-out pretraining loss after minus before), and
per step in metrics.jsonl: score, KL, beta, entropy, clip fraction, value loss, explained
variance, reply length, rollout and training seconds.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.config import PPOConfig, RunConfig
from lmforge.data.readers import SkipReport, read_records
from lmforge.data.sft import checked_messages
from lmforge.data.shards import TokenBatches, load_shard
from lmforge.eval.gold import compare_to_reference, spread
from lmforge.eval.lm import lm_loss
from lmforge.io import load_model_dir, sha256_file
from lmforge.losses import (
    IGNORE_INDEX,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_cross_entropy,
    masked_mean,
)
from lmforge.model import Transformer
from lmforge.model.reward import RewardModel, load_reward_model, score
from lmforge.rewards import USES_REWARD_MODEL, build_reward
from lmforge.rollout import (
    RankRows,
    Rollout,
    check_prompt_split,
    checkpoint_step,
    fitting,
    my_prompts,
    rank_rows,
    reply_batch,
    reply_hidden,
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
    all_reduce_sums,
    build_optimizer,
    console,
    finish_training,
    setup_device,
    start_log,
)
from lmforge.world.scoring import gold_score

PRETRAINING_SHARDS = ["sft/data", "clean/tokens", "pretrain/data"]
LM_EVAL_ROWS, LM_EVAL_BATCHES = 16, 16  # held-out pretraining windows scored before and after


class ValueHead(nn.Module):
    """V(state) = w . h_t + b on the policy's final hidden states, zero at the start."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1).float()  # (B, T)


def read_conversations(path: Path, skips: SkipReport | None) -> list[dict]:
    """Held-out or training prompt records with `messages` (world pref files keep their
    `kind`, `lang` and `answer` for the gold scorer)."""
    out = []
    for where, record in read_records(path, skips):
        record["messages"] = checked_messages(record.get("messages"), where)
        out.append(record)
    return out


def adapt_kl(beta: float, kl: float, target: float, replies: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: beta grows when KL is above target."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + error * replies / horizon)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, d: Dist | None = None
) -> tuple[float, float]:
    """Mean and variance of x over the masked tokens (under torchrun, every rank's)."""
    m = mask.bool()
    x = x[m].double()
    n, total, squares = all_reduce_sums(
        [m.sum().item(), x.sum().item(), (x * x).sum().item()], d or Dist()
    )
    mean = total / max(n, 1)
    return mean, max(squares / max(n, 1) - mean * mean, 0.0)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, d: Dist | None = None
) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens."""
    var = masked_moments(returns, mask, d)[1]
    return 1.0 - masked_moments(returns - values, mask, d)[1] / var if var > 0 else 0.0


def pretraining_windows(
    cfg: RunConfig, run_dir: Path, policy: Transformer
) -> tuple[TokenBatches | None, TokenBatches | None]:
    """Held-out windows of pretraining text (for the forgetting figure) and training
    windows (for PPO-ptx) from the run's token shards, or (None, None) without any."""
    seq_len = min(cfg.pretrain.seq_len, policy.cfg.max_seq_len)
    for candidate in PRETRAINING_SHARDS:
        shards = Path(run_dir) / candidate
        if (shards / "train.npy").exists() and (shards / "val.npy").exists():
            val = TokenBatches(load_shard(shards / "val.npy"), seq_len, LM_EVAL_ROWS, cfg.seed)
            train = TokenBatches(
                load_shard(shards / "train.npy"), seq_len, cfg.ppo.ptx_rows, cfg.seed
            )
            return val, train
    return None, None


def held_out_lm_loss(model: Transformer, windows: TokenBatches | None, d: Dist) -> float | None:
    """Next-token loss on the first LM_EVAL_BATCHES x LM_EVAL_ROWS held-out windows (under
    torchrun each rank scores its share of every batch: the same windows, for any number of
    processes that divides LM_EVAL_ROWS)."""
    if windows is None:
        return None
    n_batches = max(1, min(LM_EVAL_BATCHES, windows.n_windows // LM_EVAL_ROWS))
    rows = max(1, LM_EVAL_ROWS // d.world_size)
    return lm_loss(model, windows, n_batches, rows, d, contextlib.nullcontext)


def ppo_update(
    policy: Transformer,
    value_head: ValueHead,
    reference: Transformer,
    optimizer: torch.optim.Optimizer,
    rollouts: list[Rollout],
    scores: torch.Tensor,
    beta: float,
    pc: PPOConfig,
    pad_id: int,
    device: torch.device,
    ptx: TokenBatches | None,
    ptx_step: int,
    d: Dist | None = None,
    rows: RankRows | None = None,
) -> dict[str, float]:
    """One PPO update on a rollout batch whose first B replies scored `scores` (B,):
    per-token rewards, GAE, then `pc.iterations` x `pc.minibatches` clipped policy and value
    steps (plus the pretraining loss when `pc.ptx_coef` > 0). Returns the batch's KL (nats
    per reply) and explained variance, and the steps' mean loss, clip fraction, value loss
    and entropy.

    Under torchrun (`d`) the replies sit in the whole batch where `rows` says, as in
    `grpo.policy_update`: advantages are whitened, and the
    KL and explained variance taken, over every rank's tokens, and each step is the one a
    single process takes. A rank with no reply to learn from (B = 0) still passes one."""
    d, rows = d or Dist(), rows or RankRows()
    n_rows = len(scores)
    batch = reply_batch(rollouts, pad_id, rows.width).to(device)
    y, old = batch.targets, batch.old
    mask = y != IGNORE_INDEX
    mask[n_rows:] = False  # a placeholder reply counts in no figure
    with torch.no_grad():
        ref, _ = reply_logprobs(reference, batch, None, pc.temperature)
        old_values = value_head(reply_hidden(policy, batch))
    kl = (old - ref) * mask  # log pi/ref of each sampled token
    rewards = -beta * kl
    last = (mask * torch.arange(mask.size(1), device=device)).argmax(1)  # each reply's end
    rewards[torch.arange(n_rows, device=device), last[:n_rows]] += scores.to(device)
    adv, returns = gae(rewards, old_values, mask, pc.gamma, pc.lam)
    mean, var = masked_moments(adv, mask, d)
    adv = (adv - mean) / (var**0.5 + 1e-8) * mask

    def step_loss(mine: list[int], k: int) -> tuple[torch.Tensor, dict[str, float], float]:
        mb = mine or [0]  # no row of this minibatch here: a loss of weight 0 (see update_passes)
        hidden = reply_hidden(policy, batch, mb)
        logp, entropy = reply_logprobs(
            policy, batch, mb, pc.temperature, hidden=hidden, with_entropy=True
        )
        per_token, clipped = clipped_policy_loss(logp, old[mb], adv[mb], pc.clip_eps)
        # the value head reads the policy's features but does not train them: through a shared
        # trunk, a value loss that grew with the KL penalty (to 85) wrecked the policy (entropy
        # 0.7 -> 4.6, 98% of replies truncated) at beta 0.2
        value_loss = clipped_value_loss(
            value_head(hidden.detach()), old_values[mb], returns[mb], pc.value_clip
        )
        loss = masked_mean(per_token, mask[mb]) + pc.vf_coef * masked_mean(value_loss, mask[mb])
        figures = {}
        if pc.ptx_coef > 0 and ptx is not None:
            # under torchrun every rank takes the same windows, which the shares count once:
            # exact, for world_size times one rank's pretraining compute
            px, py = ptx.micro_batch(ptx_step + k, 0, pc.ptx_rows, 0, 1)
            ptx_loss = masked_cross_entropy(policy(px.to(device)), py.to(device))
            loss = loss + pc.ptx_coef * ptx_loss
            figures["ptx_loss"] = ptx_loss.item()
        with torch.no_grad():
            figures |= {
                "clip_fraction": masked_mean(clipped, mask[mb]).item(),
                "value_loss": masked_mean(value_loss, mask[mb]).item(),
                "entropy": masked_mean(entropy, mask[mb]).item(),
            }
        return loss, figures, float(mask[mine].sum())

    policy.train()
    figures = update_passes(
        list(policy.parameters()) + list(value_head.parameters()),
        optimizer,
        n_rows,
        pc.iterations,
        pc.minibatches,
        pc.grad_clip,
        step_loss,
        d,
        rows.offset,
        rows.total,
    )
    kl_sum, replies = all_reduce_sums([kl.sum().item(), n_rows], d)
    return figures | {
        "kl": round(kl_sum / replies, 5),
        "explained_variance": round(explained_variance(old_values, returns, mask, d), 5),
    }


@torch.no_grad()
def probe(
    policy: Transformer,
    reference: Transformer,
    tokenizer: Tokenizer,
    reward_model: RewardModel,
    rm_tokenizer: Tokenizer,
    records: list[dict],
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """One sampled reply to each held-out record: the mean gold score, reward-model score
    and KL(policy || reference) in nats per reply, the three curves of over-optimisation."""
    rolls = rollout(
        policy, tokenizer, records, list(range(len(records))), 1, max_new_tokens, 1.0, seed
    )
    device = next(policy.parameters()).device
    batch = reply_batch(rolls, tokenizer.pad_id).to(device)
    ref, _ = reply_logprobs(reference, batch)
    kl = ((batch.old - ref) * (batch.targets != IGNORE_INDEX)).sum(1).mean().item()
    texts = [(records[r.record]["messages"], r.text) for r in rolls]
    proxy = score(reward_model, rm_tokenizer, texts, reward_model.trunk.cfg.max_seq_len)
    gold = [
        gold_score(
            records[r.record]["kind"],
            records[r.record]["lang"],
            r.text,
            records[r.record]["answer"],
        )["score"]
        for r in rolls
    ]
    return {
        "eval_gold": round(statistics.fmean(gold), 4),
        "eval_proxy": round(statistics.fmean(proxy), 4),
        "eval_kl": round(kl, 4),
    }


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "ppo") -> dict:
    """Train the SFT model with PPO against the reward model into DIR/<stage>/; `resume`
    continues from the newest checkpoint in DIR/<stage>/checkpoints/."""
    pc: PPOConfig = cfg.ppo
    timer = Timer()
    check_prompt_split("ppo", pc)
    d = setup_device(pc.device, pc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage, cfg)
    base_dir = find_model_dir(run_dir, pc.model, "ppo.model", ["sft", "pretrain"])
    policy, tokenizer = load_model_dir(base_dir, d.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_head = ValueHead(policy.cfg.dim).to(d.device)
    reward = build_reward(pc, "ppo", run_dir, policy, tokenizer, d.device)
    skips = SkipReport() if pc.skip_bad else None
    data_path = find_input(run_dir, pc.data, "ppo.data", ["world/pref_train.jsonl"])
    eval_path = find_input(run_dir, pc.eval_data, "ppo.eval_data", ["world/pref_eval.jsonl"])
    records, too_long = fitting(
        read_conversations(data_path, skips), tokenizer, policy, pc.max_new_tokens
    )
    if not records:
        raise ValueError(f"ppo: no prompt in {data_path} leaves max_new_tokens in the context")
    held = read_conversations(eval_path, skips)
    gold_scored = all("kind" in r and "answer" in r for r in held)
    probes = spread(held, pc.probe_prompts) if pc.eval_every and gold_scored else []
    rm_dir = None  # the reward model, where a reward source or the probes use it
    if probes or USES_REWARD_MODEL & set(pc.rewards):
        rm_dir = find_model_dir(run_dir, pc.reward_model, "ppo.reward_model", ["rm/model"])
    if probes and d.is_main:  # they follow the reward model's score too (rank 0 probes)
        reward_model, rm_tokenizer, _ = load_reward_model(rm_dir, d.device)
    if pc.eval_prompts:
        held = spread(held, pc.eval_prompts)
    val_windows, ptx = pretraining_windows(cfg, run_dir, policy)
    if pc.ptx_coef > 0 and ptx is None:
        raise ValueError("ppo: ptx_coef > 0 needs pretraining token shards in the run")
    loss_before = held_out_lm_loss(policy, val_windows, d)
    if d.is_main:
        console.print(
            f"ppo: {len(records)} prompts from {data_path}; {pc.steps} steps x "
            f"{pc.prompts_per_step} replies on {d.device} x {d.world_size}; rewards {pc.rewards}"
        )

    def track() -> dict[str, float]:
        return probe(
            policy,
            reference,
            tokenizer,
            reward_model,
            rm_tokenizer,
            probes,
            pc.max_new_tokens,
            cfg.seed,
        )

    both = nn.ModuleList([policy, value_head])
    optimizer = build_optimizer(both, pc.lr, pc.weight_decay, (pc.beta1, pc.beta2))
    # a checkpoint resumes only the run it came from: same batch size, same starting model
    expect = {
        "prompts_per_step": pc.prompts_per_step,
        "base_model_sha256": sha256_file(base_dir / "model.safetensors"),
    }
    log, batches, state = start_log(
        out,
        len(records),
        pc.prompts_per_step,
        cfg.seed,
        both,
        optimizer,
        expect,
        resume,
        "ppo",
        d.is_main,
    )
    beta = state.get("beta", pc.kl_coef)  # the adaptive controller's, where it left off
    elapsed_before = state.get("elapsed_seconds", 0.0)
    start, generated = time.perf_counter(), 0
    mine = my_prompts(pc.prompts_per_step, d)
    with (
        TrainingProgress(pc.steps, "ppo", enabled=d.is_main) as progress,
        training_matmuls(pc, d, policy, reference),
    ):
        for step, lr in rl_steps(pc, optimizer, state["step"], elapsed_before, d):
            tracked = {}
            if probes and d.is_main and (step - 1) % pc.eval_every == 0:
                with policy.matmuls_in(None), reference.matmuls_in(None):  # float32 figures
                    tracked = track()
            t0 = time.perf_counter()
            indices = next(batches)[mine]
            rolls = rollout(
                policy,
                tokenizer,
                records,
                indices,
                1,
                pc.max_new_tokens,
                pc.temperature,
                seed=reply_seeds(cfg.seed, step, mine.start, len(indices)),
            )
            raw = reward([records[r.record] for r in rolls], [r.text for r in rolls])
            scores = raw.clamp(-pc.reward_clip, pc.reward_clip)
            truncated = torch.tensor([r.truncated for r in rolls])
            if pc.truncated == "penalty":
                scores = torch.where(truncated, pc.truncation_reward, scores)
            kept = [
                r for r, t in zip(rolls, truncated.tolist()) if not t or pc.truncated == "penalty"
            ]
            scores = scores[~truncated] if pc.truncated == "exclude" else scores
            t1 = time.perf_counter()
            rows = rank_rows(kept, d)
            figures = {}
            if rows.total:
                figures = ppo_update(
                    policy,
                    value_head,
                    reference,
                    optimizer,
                    kept or rolls[:1],
                    scores,
                    beta,
                    pc,
                    tokenizer.pad_id,
                    d.device,
                    ptx,
                    step * pc.iterations * pc.minibatches,
                    d,
                    rows,
                )
            train_seconds = time.perf_counter() - t1
            if pc.kl_target > 0 and figures:
                beta = adapt_kl(beta, figures["kl"], pc.kl_target, rows.total, pc.kl_horizon)
            totals = [
                raw.sum().item(),
                scores.sum().item(),
                len(scores),
                truncated.sum().item(),
                sum(len(r.tokens) for r in rolls),
            ]
            scored, clipped, n_scores, cut, tokens = all_reduce_sums(totals, d)
            log.write(
                step=step,
                loss=figures.get("loss", 0.0),
                score=round(scored / pc.prompts_per_step, 4),
                score_clipped=round(clipped / n_scores, 4) if n_scores else 0.0,
                **{k: v for k, v in figures.items() if k != "loss"},
                beta=round(beta, 5),
                truncated=round(cut / pc.prompts_per_step, 4),
                reply_tokens=round(tokens / pc.prompts_per_step, 2),
                rollout_seconds=round(t1 - t0, 3),
                train_seconds=round(train_seconds, 3),
                lr=lr,
                **tracked,
            )
            elapsed = elapsed_before + time.perf_counter() - start
            saved = {**expect, "beta": beta, "elapsed_seconds": round(elapsed, 3)}
            checkpoint_step(out, step, both, optimizer, pc, saved, d)
            generated += tokens
            tok_s = generated / (time.perf_counter() - start)  # sampled tokens
            progress.update(step, loss=figures.get("loss", float("nan")), tok_s=tok_s)

    if d.is_main:
        finish_training(out, policy, tokenizer, log, "ppo")
    loss_after = held_out_lm_loss(policy, val_windows, d)
    if not d.is_main:  # under torchrun, rank 0 saves and measures
        return {}
    history = log.read()  # the whole run's, across resumes
    tenth = max(1, len(history) // 10)
    steps_done = history[-1]["step"] if history else 0
    summary = {
        "base_model": str(base_dir),
        "reward_model": str(rm_dir) if rm_dir else None,
        "steps": steps_done,
        "updates": sum("kl" in r for r in history),  # steps with replies to learn from
        "score_first": round(sum(r["score"] for r in history[:tenth]) / tenth, 4),
        "score_last": round(sum(r["score"] for r in history[-tenth:]) / tenth, 4),
        "beta_final": round(beta, 5),
        "ptx_coef": pc.ptx_coef,
        "rollout_seconds": round(sum(r["rollout_seconds"] for r in history), 1),
        "train_seconds": round(sum(r["train_seconds"] for r in history), 1),
        "data_skipped": len(skips.skipped) if skips else 0,
        "prompts_too_long": too_long,
    }
    if loss_before is not None:
        summary |= {
            "pretrain_loss_before": round(loss_before, 5),
            "pretrain_loss_after": round(loss_after, 5),
            "pretrain_loss_delta": round(loss_after - loss_before, 5),
        }
    if probes:  # the curves' last point, after the last step
        log.write(
            step=steps_done + 1,
            **track(),
        )
    if gold_scored:
        figures = compare_to_reference(
            policy,
            reference,
            tokenizer,
            held,
            pc.max_new_tokens,
            pc.kl_prompts,
            cfg.seed,
            pc.eval_samples,
        )
        summary |= {
            "gold_score": figures["gold_mean"],
            "gold_score_before": figures["gold_mean_sft"],
        }
        summary |= figures
    console.print(f"ppo: {summary}")
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x {d.world_size}")
    return write_summary(out, summary)
