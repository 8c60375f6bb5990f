"""A policy judged by the world's gold scorer: win rate against another policy, and its KL
divergence from a reference model.

- `gold_replies`: greedy replies to held-out prompts (records with `messages`, `kind`,
  `lang`, `answer`, as in world/pref_eval.jsonl) and their gold scores;
- `win_rate`: how often one policy's reply scores higher than another's on the same prompt;
- `kl_to_reference`: KL(pi || ref) estimated on the policy's own samples,
  mean over samples of sum_t [log pi(y_t | y_<t) - log ref(y_t | y_<t)] (nats per reply).
"""

from __future__ import annotations

import statistics

import torch

from lmforge.data.preferences import collate_completions
from lmforge.eval.chat import chat_prompts, reply
from lmforge.generate import generate
from lmforge.losses import IGNORE_INDEX, sequence_logprobs
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.world.scoring import gold_score


def spread(records: list, n: int) -> list:
    """n records evenly spaced through `records` (all of them if n >= len): the world's
    files list prompts kind by kind and language by language, so a prefix would be one kind."""
    if n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def gold_replies(
    model: Transformer, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int
) -> list[dict]:
    """Greedy reply and gold score (with its parts) for each record."""
    replies = reply(model, tokenizer, [r["messages"] for r in records], max_new_tokens)
    return [
        {"reply": text} | gold_score(r["kind"], r["lang"], text, r["answer"])
        for r, (text, _) in zip(records, replies)
    ]


def win_rate(scores: list[float], baseline: list[float]) -> dict[str, float]:
    """`win_rate`: the share of prompts where `scores` beats `baseline`, ties counting half
    (AlpacaEval's convention); also the raw wins, losses and ties."""
    wins = sum(a > b for a, b in zip(scores, baseline))
    losses = sum(a < b for a, b in zip(scores, baseline))
    ties = len(scores) - wins - losses
    return {
        "win_rate": round((wins + ties / 2) / max(len(scores), 1), 4),
        "wins": wins,
        "losses": losses,
        "ties": ties,
    }


def summed_logprobs(
    model: Transformer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.sequence_logprobs` of the targets y (B, T) after inputs x (B, T), right-padded
    (`collate_completions`), with logits computed only where a target is."""
    return sequence_logprobs(model.logits_at(x, y != IGNORE_INDEX), y)


@torch.no_grad()
def completion_logprobs(
    model: Transformer, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64
) -> list[float]:
    """Summed log-probability of each row's targets (inputs, targets as `encode_completion`)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        x, y = collate_completions(rows[i : i + batch_size], pad_id)
        logp, _ = summed_logprobs(model, x.to(device), y.to(device))
        out += logp.tolist()
    return out


def sample_replies(
    policy: Transformer,
    tokenizer: Tokenizer,
    conversations: list[list[dict]],
    k: int,
    max_new_tokens: int,
    seed: int,
    prompts_per_call: int = 1,
) -> list[tuple[list[int], int, list[list[int]]]]:
    """k replies (temperature 1, stopping at the end token) to each conversation, as
    (prompt ids, token budget, the k replies' ids). `prompts_per_call` conversations share
    one batched `generate` call, seeded with seed + the index of its first conversation; the
    budget is max_new_tokens cut to what the call's longest prompt leaves of the context."""
    out = []
    for start in range(0, len(conversations), prompts_per_call):
        batch = conversations[start : start + prompts_per_call]
        prompts, budget = chat_prompts(policy, tokenizer, batch, max_new_tokens)
        rows = generate(
            policy,
            [p for p in prompts for _ in range(k)],
            budget,
            temperature=1.0,
            stop_ids=[tokenizer.end_id],
            pad_id=tokenizer.pad_id,
            seed=seed + start,
        )
        out += [(p, budget, rows[i * k : (i + 1) * k]) for i, p in enumerate(prompts)]
    return out


def kl_to_reference(
    policy: Transformer,
    reference: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    max_new_tokens: int,
    seed: int,
    samples_per_prompt: int = 4,
) -> float:
    """KL(policy || reference) in nats per reply, from `samples_per_prompt` samples of the
    policy (temperature 1) for each record's prompt; a reply that stopped includes its end
    token, as the policy chose to emit it."""
    rows: list[tuple[list[int], list[int]]] = []
    conversations = [r["messages"] for r in records]
    for prompt, budget, samples in sample_replies(
        policy, tokenizer, conversations, samples_per_prompt, max_new_tokens, seed
    ):
        for s in samples:
            completion = s + [tokenizer.end_id] if len(s) < budget else s
            ids = prompt + completion
            targets = [IGNORE_INDEX] * (len(prompt) - 1) + completion
            rows.append((ids[:-1], targets))
    pi = completion_logprobs(policy, rows, tokenizer.pad_id)
    ref = completion_logprobs(reference, rows, tokenizer.pad_id)
    return round(statistics.fmean(a - b for a, b in zip(pi, ref)), 4)


def sampled_scores(
    model: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    k: int,
    max_new_tokens: int,
    seed: int,
) -> list[float]:
    """Gold scores of k replies sampled at temperature 1 for each record, record by record."""
    samples = sample_replies(
        model, tokenizer, [r["messages"] for r in records], k, max_new_tokens, seed, 16
    )
    return [
        gold_score(r["kind"], r["lang"], tokenizer.decode(row), r["answer"])["score"]
        for r, (_, _, rows) in zip(records, samples)
        for row in rows
    ]


def compare_to_reference(
    policy: Transformer,
    reference: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    max_new_tokens: int,
    kl_prompts: int,
    seed: int,
    samples_per_prompt: int = 4,
) -> dict:
    """The figures of a policy trained away from `reference` (e.g. DPO from the SFT model) on
    held-out `records`:

    - `win_rate_vs_sft` (with its counts and both mean gold scores): the policy as it is, a
      distribution, so `samples_per_prompt` replies of each model sampled at temperature 1,
      the i-th of one against the i-th of the other. Both draw from the same random stream,
      so where the two distributions agree the replies do too and tie;
    - `win_rate_vs_sft_greedy`: the greedy replies, which move only where training flipped the
      most likely token;
    - `kl_to_ref` on `kl_prompts` of the records (`spread`)."""
    ours = sampled_scores(policy, tokenizer, records, samples_per_prompt, max_new_tokens, seed)
    theirs = sampled_scores(reference, tokenizer, records, samples_per_prompt, max_new_tokens, seed)
    wins = win_rate(ours, theirs)
    greedy_ours = gold_replies(policy, tokenizer, records, max_new_tokens)
    greedy_theirs = gold_replies(reference, tokenizer, records, max_new_tokens)
    greedy = win_rate([r["score"] for r in greedy_ours], [r["score"] for r in greedy_theirs])
    return {
        "win_rate_vs_sft": wins["win_rate"],
        "wins": wins["wins"],
        "losses": wins["losses"],
        "ties": wins["ties"],
        "gold_mean": round(statistics.fmean(ours), 4),
        "gold_mean_sft": round(statistics.fmean(theirs), 4),
        "win_rate_vs_sft_greedy": greedy["win_rate"],
        "gold_mean_greedy": round(statistics.fmean(r["score"] for r in greedy_ours), 4),
        "gold_mean_sft_greedy": round(statistics.fmean(r["score"] for r in greedy_theirs), 4),
        "kl_to_ref": kl_to_reference(
            policy, reference, tokenizer, spread(records, kl_prompts), max_new_tokens, seed
        ),
        "eval_prompts": len(records),
        "eval_samples_per_prompt": samples_per_prompt,
    }
