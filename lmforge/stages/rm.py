"""Stage `rm`: a reward model from comparisons, and best-of-N sampling against it.

    comparisons (DIR/world/pref_train.jsonl) ──────────┐
    the SFT model's own replies, ranked by annotators ─┤
    the SFT model (DIR/sft) ─── + scalar head ─────────┴─▶ DIR/rm/model/ (+ reward.json)
                                                           └▶ held-out pair accuracy, best-of-N

The reward model starts from the SFT model (`rm.model`), reads the hidden state at the end
token of each (prompt, response) and is trained on every pair of every ranking with

    L = -log sigmoid(r_chosen - r_rejected - margin) [+ c * (r_chosen + r_rejected)^2]

(the optional second term, `rm.center_coef`, keeps rewards centred on 0). A step takes
`rm.batch_size` prompts and scores each distinct response once, however many pairs it is in.
Besides the world's written comparisons, the SFT model answers every training prompt
`rm.policy_samples` times and the world's simulated annotators rank those replies
(`label_policy_samples`, DIR/rm/policy_rankings.jsonl): the reward model must judge the
policy's own mistakes, not only the written ones.

Figures: `pair_accuracy` on held-out rankings (annotator A's order) against
`annotator_agreement` (annotator B against A: a reward model learned from A-like labels
cannot expect to agree with A more than B does); `pair_accuracy_gold` against the gold
order; the reward's mean and standard deviation on held-out responses (stored with the
model, for later stages to normalise); and the best-of-N curve: the SFT model samples 64
answers to held-out prompts, the reward model picks one of the first N, and the gold scorer
says how good it is (`gold_best_of_N`, plotted in best_of_n.png).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import RunConfig
from lmforge.data.preferences import Pair, data_figures, ordered_pairs, read_pairs
from lmforge.data.readers import SkipReport
from lmforge.eval.gold import sample_replies, spread
from lmforge.io import load_model_dir, sha256_file, write_jsonl_atomic
from lmforge.losses import bradley_terry_loss
from lmforge.model.reward import RewardModel, collate_scored, encode_scored, save_reward_model
from lmforge.model.reward import score as reward_score
from lmforge.runs import Timer, find_input, find_model_dir, stage_dir, write_summary
from lmforge.train_utils import (
    console,
    planned_steps,
    setup_device,
    train_on_batches,
)
from lmforge.world.preferences import annotate, calibrate_noise, pair_agreement
from lmforge.world.scoring import gold_score

BEST_OF = (1, 2, 4, 8, 16, 32, 64)


def group_pairs(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs grouped by the record they came from (a ranking's pairs share their file:line),
    in first-seen order: one prompt's responses are then scored together."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.where, []).append(p)
    return list(groups.values())


def pair_loss(
    model: RewardModel, tokenizer, groups: list[list[Pair]], max_len: int, center_coef: float
) -> tuple[torch.Tensor, float, int]:
    """(loss, accuracy, tokens computed) of a batch of groups: each distinct (context, response) is scored once;
    a group's pair weights sum to its share of the batch."""
    device = next(model.parameters()).device
    index: dict[tuple[str, str], int] = {}
    rows: list[list[int]] = []
    chosen, rejected, weights, margins = [], [], [], []
    for group in groups:
        context = json.dumps(group[0].messages, ensure_ascii=False)
        total = sum(p.weight for p in group)
        for p in group:
            for text, out in ((p.chosen, chosen), (p.rejected, rejected)):
                key = (context, text)
                if key not in index:
                    index[key] = len(rows)
                    rows.append(encode_scored(tokenizer, p.messages, text, max_len))
                out.append(index[key])
            weights.append(p.weight / total)
            margins.append(p.margin)
    ids, lengths = collate_scored(rows, tokenizer.pad_id)
    rewards = model(ids.to(device), lengths.to(device))
    r_c, r_r = rewards[torch.tensor(chosen)], rewards[torch.tensor(rejected)]
    w = torch.tensor(weights, device=device)
    losses = bradley_terry_loss(r_c, r_r, torch.tensor(margins, device=device))
    loss = (w * losses).sum() / len(groups)
    if center_coef:
        loss = loss + center_coef * ((r_c + r_r) ** 2).mean()
    return loss, (r_c > r_r).float().mean().item(), int(lengths.sum())


def evaluate_rankings(model: RewardModel, tokenizer, records: list[dict], max_len: int) -> dict:
    """Held-out figures on world rankings (records with `ranking`, `ranking_b`, `answer`)."""
    items = [(r["messages"], resp) for r in records for resp in r["responses"]]
    rewards = reward_score(model, tokenizer, items, max_len)
    hits = gold_hits = gold_pairs = 0
    pairs = 0
    k = 0
    for r in records:
        rs = rewards[k : k + len(r["responses"])]
        k += len(r["responses"])
        gold = [gold_score(r["kind"], r["lang"], t, r["answer"])["score"] for t in r["responses"]]
        for a, b in ordered_pairs(r["ranking"]):
            hits += rs[a] > rs[b]
            pairs += 1
            if gold[a] != gold[b]:
                gold_pairs += 1
                gold_hits += (rs[a] > rs[b]) == (gold[a] > gold[b])
    agreement = pair_agreement([r["ranking"] for r in records], [r["ranking_b"] for r in records])
    return {
        "pair_accuracy": round(hits / max(pairs, 1), 4),
        "annotator_agreement": round(agreement, 4),
        "pair_accuracy_gold": round(gold_hits / max(gold_pairs, 1), 4),
        "eval_pairs": pairs,
        "reward_mean": round(statistics.fmean(rewards), 4),
        "reward_std": round(statistics.pstdev(rewards), 4),
    }


def evaluate_pairs(model: RewardModel, tokenizer, pairs: list[Pair], max_len: int) -> dict:
    """Held-out figures on plain pairs (real data: no second annotator, no gold)."""
    chosen = reward_score(model, tokenizer, [(p.messages, p.chosen) for p in pairs], max_len)
    rejected = reward_score(model, tokenizer, [(p.messages, p.rejected) for p in pairs], max_len)
    rewards = chosen + rejected
    return {
        "pair_accuracy": round(sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), 4),
        "eval_pairs": len(pairs),
        "reward_mean": round(statistics.fmean(rewards), 4),
        "reward_std": round(statistics.pstdev(rewards), 4),
    }


def best_of_n(
    policy,
    reward: RewardModel,
    tokenizer,
    records: list[dict],
    max_len: int,
    max_new_tokens: int,
    seed: int,
) -> dict[int, float]:
    """Mean gold score of the reward model's pick among N samples, for each N in BEST_OF.
    Each prompt gets 64 samples; best-of-N averages over the 64 / N disjoint groups of N, an
    unbiased estimate with less noise than one draw of N."""
    n_max = BEST_OF[-1]
    curve = {n: [] for n in BEST_OF}
    sampled = sample_replies(
        policy, tokenizer, [r["messages"] for r in records], n_max, max_new_tokens, seed
    )
    for r, (_, _, samples) in zip(records, sampled):
        texts = [tokenizer.decode(s) for s in samples]
        rewards = reward_score(reward, tokenizer, [(r["messages"], t) for t in texts], max_len)
        gold = [gold_score(r["kind"], r["lang"], t, r["answer"])["score"] for t in texts]
        for n in BEST_OF:
            picks = [max(range(g, g + n), key=lambda j: rewards[j]) for g in range(0, n_max, n)]
            curve[n].append(statistics.fmean(gold[j] for j in picks))
    return {n: round(statistics.fmean(v), 4) for n, v in curve.items()}


def label_policy_samples(
    policy,
    tokenizer,
    records: list[dict],
    k: int,
    max_new_tokens: int,
    agreement: float,
    seed: int,
) -> list[dict]:
    """Rankings of the policy's own replies: k samples (temperature 1) for each record's
    prompt, ranked by simulated annotators (gold score plus noise at which two of them agree
    on `agreement` of the pairs), as InstructGPT's labelers ranked its SFT model's outputs.
    A reward model that only saw written responses has never seen the ways this policy goes
    wrong, and best-of-N would pick exactly those."""
    sampled = sample_replies(
        policy,
        tokenizer,
        [r["messages"] for r in records],
        k,
        max_new_tokens,
        seed,
        prompts_per_call=max(1, 64 // k),  # batches of about 64 rows
    )
    replies = [[tokenizer.decode(o) for o in samples] for _, _, samples in sampled]
    golds = [
        [gold_score(r["kind"], r["lang"], t, r["answer"])["score"] for t in rs]
        for r, rs in zip(records, replies)
    ]
    sigma = calibrate_noise(golds, agreement, seed)
    rng = random.Random(seed)
    return [
        {
            "messages": r["messages"],
            "responses": rs,
            "ranking": annotate(g, sigma, rng),
            "kind": r["kind"],
            "lang": r["lang"],
        }
        for r, rs, g in zip(records, replies, golds)
    ]


def plot_best_of_n(curve: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(curve), list(curve.values()), marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples the reward model chooses from)")
    ax.set_ylabel("mean gold score of the pick")
    ax.set_title("best-of-N on held-out prompts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "rm") -> dict:
    """Train the reward model into DIR/<stage>/ and measure it; `resume` continues from the
    newest checkpoint in DIR/<stage>/checkpoints/."""
    timer = Timer()
    rc = cfg.rm
    d = setup_device(rc.device, rc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage, cfg)
    base_dir = find_model_dir(run_dir, rc.model, "rm.model", ["sft", "pretrain"])
    trunk, tokenizer = load_model_dir(base_dir, d.device)
    torch.manual_seed(cfg.seed)
    model = RewardModel(trunk).to(d.device)
    max_len = min(rc.max_len, trunk.cfg.max_seq_len)

    data_path = find_input(run_dir, rc.data, "rm.data", ["world/pref_train.jsonl"])
    pairs, report = read_pairs(data_path, SkipReport() if rc.skip_bad else None)
    policy_path = run_dir / "sft" / "model.safetensors"
    policy = load_model_dir(policy_path.parent, d.device)[0] if policy_path.exists() else None
    labelled = 0
    own_replies = bool(rc.policy_samples and rc.data is None and policy is not None)
    if own_replies:
        if d.is_main:  # under torchrun, the other ranks read what rank 0 sampled
            records = [json.loads(line) for line in data_path.open(encoding="utf-8")]
            sampled = label_policy_samples(
                policy,
                tokenizer,
                records,
                rc.policy_samples,
                rc.max_new_tokens,
                cfg.world.pref_annotator_agreement,
                cfg.seed,
            )
            write_jsonl_atomic(out / "policy_rankings.jsonl", sampled)
            labelled = len(sampled)
        if d.world_size > 1:
            dist.barrier()
        more, _ = read_pairs(out / "policy_rankings.jsonl")
        pairs += more
    groups = group_pairs(pairs)
    eval_records: list[dict] = []
    eval_groups: list[list[Pair]] = []
    world_eval = run_dir / "world" / "pref_eval.jsonl"
    if rc.data is None and world_eval.exists():
        eval_records = [json.loads(line) for line in world_eval.open(encoding="utf-8")]
    else:  # outside data: every 1/val_fraction-th prompt is held out (the last, if fewer)
        every = round(1 / rc.val_fraction)
        held = {i for i in range(len(groups)) if i % every == every - 1} or {len(groups) - 1}
        eval_groups = [g for i, g in enumerate(groups) if i in held]
        groups = [g for i, g in enumerate(groups) if i not in held]
    if not groups:
        raise ValueError(
            f"rm: no training pairs in {data_path} (it needs comparisons of 2 or more prompts: "
            "one is held out for evaluation)"
        )
    max_steps = planned_steps(rc, len(groups))
    if d.is_main:
        console.print(
            f"rm: {len(groups)} training prompts ({sum(len(g) for g in groups)} pairs) from "
            f"{data_path}; dropped {report['dropped_identical']} identical and "
            f"{report['dropped_mismatched_prompt']} mismatched pairs; {max_steps} steps"
        )

    def step(indices: list[int]) -> tuple[torch.Tensor, dict, int, float]:
        batch = [groups[i] for i in indices]
        loss, accuracy, n_tokens = pair_loss(model, tokenizer, batch, max_len, rc.center_coef)
        return loss, {"accuracy": round(accuracy, 4)}, n_tokens, len(batch)

    # a checkpoint resumes only the run it came from: same starting model, same comparisons
    # (the SFT model's replies are sampled again, the same on a CPU)
    expect = {
        "base_model_sha256": sha256_file(base_dir / "model.safetensors"),
        "data_sha256": sha256_file(data_path),
    }
    if own_replies:
        expect["policy_rankings_sha256"] = sha256_file(out / "policy_rankings.jsonl")
    train_on_batches(model, rc, len(groups), cfg.seed, "rm", out, step, d, resume, expect)
    if not d.is_main:  # under torchrun, rank 0 saves and measures
        return {}
    if eval_records:
        figures = evaluate_rankings(model, tokenizer, eval_records, max_len)
    else:
        figures = evaluate_pairs(model, tokenizer, [p for g in eval_groups for p in g], max_len)
    stats = {"reward_mean": figures["reward_mean"], "reward_std": figures["reward_std"]}
    save_reward_model(out / "model", model, tokenizer, stats | {"base_model": str(base_dir)})
    summary = {
        **figures,
        "train_prompts": len(groups),
        "policy_rankings": labelled,
        "train_pairs": sum(len(g) for g in groups),
        **data_figures(report),
        "base_model": str(base_dir),
        "steps": max_steps,
    }
    if "annotator_agreement" in figures:
        summary["accuracy_vs_ceiling"] = round(
            figures["pair_accuracy"] / figures["annotator_agreement"], 4
        )
    if eval_records and rc.best_of_prompts and policy is not None:
        prompts = spread(eval_records, rc.best_of_prompts)
        curve = best_of_n(policy, model, tokenizer, prompts, max_len, rc.max_new_tokens, cfg.seed)
        summary |= {f"gold_best_of_{n}": v for n, v in curve.items()}
        plot_best_of_n(curve, out / "best_of_n.png")
    console.print(f"rm: {json.dumps(summary)}")
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x {d.world_size}")
    return write_summary(out, summary)
