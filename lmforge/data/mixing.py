"""Mixing: how many times each source is seen per epoch of the cleaned corpus.

A weight of 2 writes every document of that source twice, 0.5 keeps a (seeded, per
document) half of them, and 1 is the default. A weight is given per source or per source
prefix ("web" covers "web/crawl"); the longest matching key wins.
"""

from __future__ import annotations

from lmforge.data.text import stable_hash


def weight_for(source: str, mix: dict[str, float]) -> float:
    """The weight of `source`: the longest key of `mix` that is the source or a "/"-prefix of it."""
    best, weight = -1, 1.0
    for key, w in mix.items():
        if (source == key or source.startswith(key.rstrip("/") + "/")) and len(key) > best:
            best, weight = len(key), w
    return weight


def copies(weight: float, text: str, seed: int) -> int:
    """Copies of a document per epoch: the whole part of `weight`, plus one more with
    probability equal to its fractional part, decided by a hash of the text (so the same
    documents are chosen whatever the order or the number of workers)."""
    whole = int(weight)
    fraction = weight - whole
    return whole + (stable_hash(f"{seed}:{text}") / 2**64 < fraction)
