"""Deduplication: exact (hash of normalised text), near (MinHash + LSH, datasketch) and
paragraphs repeated across many documents (boilerplate: cookie notices, footers).

A near duplicate is a pair whose shingle sets have an estimated Jaccard similarity of at
least the threshold and, optionally, whose shorter text is almost wholly contained, word for
word and in order, in the longer (`min_containment`). Shingle sets ignore order and treat a
changed name like any other word, so templated texts (the same sentence about another person,
the same facts in another order) look alike; containment tells them from true copies, which
a mirror makes by adding to a text (a trailer, a word) rather than by rewriting it.

Which copy survives: of a group of duplicates the shortest is kept, ties going to the
earliest. Mirrors and reposts add to a text (a "reposted" line, a trailer, an inserted word)
far more often than they cut it, so the shortest copy is the likeliest original, and the
choice does not depend on the order in which the copies happen to be read.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.data.text import normalize, stable_hash, units

# datasketch's permutation scheme, named because hash values carry no trace of it
SCHEME = "affine32"


def exact_key(text: str) -> bytes:
    """The exact-duplicate key: a 128-bit hash of the normalised text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, size: int) -> set[bytes]:
    """The set of `size`-unit shingles of `text` (units: words, CJK characters)."""
    toks = units(text)
    if len(toks) <= size:
        return {" ".join(toks).encode("utf-8")}
    return {" ".join(toks[i : i + size]).encode("utf-8") for i in range(len(toks) - size + 1)}


def containment(a: list[str], b: list[str]) -> float:
    """The share of the shorter word list that the longer holds in the same order."""
    matched = sum(
        m.size for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    )
    return matched / max(1, min(len(a), len(b)))


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int, seed: int) -> Any:
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def minhash(text: str, num_perm: int, size: int, seed: int = 1) -> np.ndarray:
    """The MinHash signature (uint64[num_perm]) of `text`'s shingles."""
    from datasketch import MinHash

    perms = _permutations(num_perm, seed)  # drawn once, not for every document
    m = MinHash(num_perm=num_perm, seed=seed, permutations=perms, scheme=SCHEME)
    m.update_batch(sorted(shingles(text, size)))
    return m.hashvalues


@dataclass
class Entry:
    """What deduplication needs to know of one document that passed the filters."""

    index: int  # position in the input
    length: int  # characters of the cleaned text
    key: bytes  # exact_key
    signature: np.ndarray | None  # minhash, or None when near dedup is off


def deduplicate(
    entries: list[Entry],
    threshold: float,
    num_perm: int,
    min_containment: float = 0.0,
    text_of: Callable[[int], str] | None = None,
    seed: int = 1,
) -> dict[int, tuple[str, int]]:
    """The documents to drop: {index: ("dedup:exact" or "dedup:near", index of the copy
    kept)}. Documents are visited shortest first (then by position); each is dropped when an
    already kept one has the same key, or is a near duplicate of it (see the module doc;
    `text_of(index)` gives a document's text for the containment check)."""
    from datasketch import LeanMinHash, MinHashLSH

    # LSH only proposes candidates, each then checked against the threshold: weigh missed
    # pairs (false negatives) well above extra candidates
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    kept_by_key: dict[bytes, int] = {}
    kept: dict[int, LeanMinHash] = {}
    order: dict[int, int] = {}
    dropped: dict[int, tuple[str, int]] = {}
    for rank, e in enumerate(sorted(entries, key=lambda e: (e.length, e.index))):
        if e.key in kept_by_key:
            dropped[e.index] = ("dedup:exact", kept_by_key[e.key])
            continue
        if e.signature is not None:
            mh = LeanMinHash(seed=seed, hashvalues=e.signature, scheme=SCHEME)
            similar = sorted(
                (i for i in lsh.query(mh) if kept[i].jaccard(mh) >= threshold), key=order.get
            )
            if min_containment > 0 and similar and text_of is not None:
                mine = units(text_of(e.index))
                similar = [
                    i for i in similar if containment(units(text_of(i)), mine) >= min_containment
                ]
            if similar:
                dropped[e.index] = ("dedup:near", similar[0])
                continue
            lsh.insert(e.index, mh)
            kept[e.index] = mh
        kept_by_key[e.key] = e.index
        order[e.index] = rank
    return dropped


def paragraphs(text: str) -> list[str]:
    """A document's paragraphs: its non-empty lines."""
    return [line for line in text.split("\n") if line.strip()]


def repeated_paragraphs(texts: Iterable[str], min_docs: int, min_chars: int) -> Counter:
    """{hash of a normalised paragraph: documents it occurs in} for every paragraph of at
    least `min_chars` characters that occurs in at least `min_docs` documents."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(
            {stable_hash(normalize(p)) for p in paragraphs(text) if len(p.strip()) >= min_chars}
        )
    return Counter({h: n for h, n in counts.items() if n >= min_docs})


def strip_paragraphs(text: str, boilerplate: Counter) -> str:
    """`text` without its boilerplate paragraphs."""
    return "\n".join(p for p in paragraphs(text) if stable_hash(normalize(p)) not in boilerplate)
