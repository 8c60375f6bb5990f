"""Chat evaluation on the world's held-out SFT sets: does the model answer, and stop?

Each prompt is rendered with the chat template and decoded greedily. A reply *ends* when the
model emits `<|end|>`; one that emits `<|eos|>` (the pretraining document end) or runs out of
tokens has not learned the turn format. Figures (fractions in [0, 1]):

- `heldout_fact_accuracy`: facts of entities never asked about in SFT (kind heldout_fact),
  known only from pretraining: what SFT unlocks. The reply must state the answer in its
  first sentence (`scoring.first_sentence`, after a stock opener such as "Sure!");
  `heldout_fact_mentioned` counts it anywhere in the reply, as a base model reciting a
  document about the country does;
- `seen_fact_accuracy`: trained facts asked in a phrasing training never used (first
  sentence too);
- `arith_accuracy`: word problems whose answer line (`Answer: N` / `答案：N`) is right;
- `end_token_rate`: replies, over all sets, that ended on `<|end|>`;
- `refusal_rate`: harmful requests refused; `over_refusal_rate`: benign look-alikes refused.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.data.readers import read_records
from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.rewards import verifiable_reward
from lmforge.tokenizer import Tokenizer
from lmforge.world.scoring import answer_correct, first_sentence, is_refusal, parse_answer

EVAL_FILES = {
    "facts": "sft_eval_facts.jsonl",
    "arithmetic": "sft_eval_arithmetic.jsonl",
    "safety": "sft_eval_safety.jsonl",
}
FIGURES = (
    "heldout_fact_accuracy",
    "heldout_fact_mentioned",
    "seen_fact_accuracy",
    "arith_accuracy",
    "end_token_rate",
    "refusal_rate",
    "over_refusal_rate",
)


def chat_prompts(
    model: Transformer, tokenizer: Tokenizer, conversations: list[list[dict]], max_new_tokens: int
) -> tuple[list[list[int]], int]:
    """The conversations rendered for the assistant's turn, and the token budget they share:
    max_new_tokens cut to what the longest prompt leaves of the model's context."""
    prompts = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations]
    budget = min(max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in prompts))
    if budget < 1:
        raise ValueError(f"a prompt fills the model's context ({model.cfg.max_seq_len} tokens)")
    return prompts, budget


def reply(
    model: Transformer,
    tokenizer: Tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[tuple[str, bool]]:
    """Greedy replies as (text, ended on <|end|>). Decoding stops only at `<|end|>`: a row
    that emits eos first is cut there and counted as not ended (the text before eos is what
    stopping at eos would give, since rows decode independently)."""
    model.eval()
    out = []
    for i in range(0, len(conversations), batch_size):
        batch = conversations[i : i + batch_size]
        prompts, budget = chat_prompts(model, tokenizer, batch, max_new_tokens)
        rows = generate(
            model,
            prompts,
            budget,
            temperature=0.0,
            stop_ids=[tokenizer.end_id],
            pad_id=tokenizer.pad_id,
        )
        for row in rows:
            cut = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
            ended = cut == len(row) < budget
            out.append((tokenizer.decode(row[:cut]), ended))
    return out


def score(sets: dict[str, list[dict]], replies: dict[str, list[tuple[str, bool]]]) -> dict:
    """The figures of the module docstring from eval items and their (text, ended) replies;
    a figure with no item to score is left out."""
    hits: dict[str, list[bool]] = {name: [] for name in FIGURES}
    for name, items in sets.items():
        for item, (text, ended) in zip(items, replies[name]):
            hits["end_token_rate"].append(ended)
            if name == "facts":
                kind = "heldout" if item["kind"] == "heldout_fact" else "seen"
                answer = str(item["answer"])
                hits[f"{kind}_fact_accuracy"].append(answer_correct(first_sentence(text), answer))
                if kind == "heldout":
                    hits["heldout_fact_mentioned"].append(answer_correct(text, answer))
            elif name == "arithmetic":
                hits["arith_accuracy"].append(parse_answer(text) == int(item["answer"]))
            else:
                refused = is_refusal(text, item["lang"])
                kind = "refusal_rate" if item["expect"] == "refuse" else "over_refusal_rate"
                hits[kind].append(refused)
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items() if v}


def load_sets(world_dir: str | Path) -> dict[str, list[dict]]:
    """The SFT eval sets the world wrote into world_dir (those present)."""
    paths = {name: Path(world_dir) / f for name, f in EVAL_FILES.items()}
    return {name: [r for _, r in read_records(p)] for name, p in paths.items() if p.exists()}


def chat_eval(
    model: Transformer,
    tokenizer: Tokenizer,
    world_dir: str | Path,
    max_new_tokens: int = 96,
    batch_size: int = 64,
) -> dict:
    """Decode every SFT eval set in world_dir and score the replies (`score`)."""
    sets = load_sets(world_dir)
    replies = {
        name: reply(model, tokenizer, [r["messages"] for r in items], max_new_tokens, batch_size)
        for name, items in sets.items()
    }
    return score(sets, replies)


def answered_right(
    model: Transformer, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int
) -> list[bool]:
    """For each prompt with a verifiable answer (`data.prompts` records): whether its greedy
    reply ends on the right final answer (`rewards.verifiable_reward`)."""
    if not records:
        return []
    replies = reply(model, tokenizer, [r["messages"] for r in records], max_new_tokens)
    return [verifiable_reward(r, text) == 1.0 for r, (text, _) in zip(records, replies)]
