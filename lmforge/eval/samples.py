"""What a model says unprompted: how many of its samples contain unwanted phrases
(for the world: the advertisement repeated thousands of times in the raw crawl)."""

from __future__ import annotations

from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


def unwanted_phrase_rate(
    model: Transformer,
    tokenizer: Tokenizer,
    phrases: list[str],
    n_samples: int = 200,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, float]:
    """Sample `n_samples` texts from <|bos|> alone and count those containing any phrase.

    Returns `samples`, `samples_with_unwanted` and `unwanted_phrase_count` (occurrences)."""
    model.eval()
    with_phrase = occurrences = 0
    for start in range(0, n_samples, batch_size):
        n = min(batch_size, n_samples - start)
        outs = generate(
            model,
            [[tokenizer.bos_id]] * n,
            max_new_tokens,
            temperature=temperature,
            stop_ids=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
            seed=seed + start,
        )
        for ids in outs:
            text = tokenizer.decode(ids)
            found = sum(text.count(p) for p in phrases)
            occurrences += found
            with_phrase += found > 0
    return {
        "samples": n_samples,
        "samples_with_unwanted": with_phrase,
        "unwanted_phrase_count": occurrences,
    }
