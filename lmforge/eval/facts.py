"""Fact completion: does greedy decoding of "The capital of X is" produce the capital?"""

from __future__ import annotations

from collections import defaultdict

from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


def is_correct(completion: str, answer: str) -> bool:
    """The completion starts with the answer as a whole word ("Velmar." yes, "Velmarx" no)."""
    text = completion.lstrip()
    if not text.startswith(answer):
        return False
    rest = text[len(answer) :]
    return not rest or not rest[0].isalnum()


def fact_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    probes: list[dict],
    batch_size: int = 64,
    max_new_tokens: int = 12,
) -> dict[str, float]:
    """Greedy completion accuracy per language and kind.

    Returns `fact_accuracy_<lang>` over capital probes (the headline figure),
    `fact_accuracy_<kind>_<lang>` for every kind present and `fact_accuracy_all` over all."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(probes), batch_size):
        chunk = probes[i : i + batch_size]
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p["prompt"])] for p in chunk]
        outs = generate(
            model,
            prompts,
            max_new_tokens,
            temperature=0.0,
            stop_ids=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
        )
        for probe, ids in zip(chunk, outs):
            ok = is_correct(tokenizer.decode(ids), probe["answer"])
            hits[f"fact_accuracy_{probe['kind']}_{probe['lang']}"].append(ok)
            hits["fact_accuracy_all"].append(ok)
            if probe["kind"] == "capital":
                hits[f"fact_accuracy_{probe['lang']}"].append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}
