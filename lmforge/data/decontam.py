"""Decontamination: find documents that contain an evaluation item.

The unit of overlap is GPT-3's (Brown et al. 2020, appendix C): n-grams of 13 words, where in
Chinese a word is a character (`text.units`). One shared 13-gram is too little when the
evaluation set is templated (short word problems that differ from training problems only in
a name or a number share many), so an item counts as found in a document that holds at least
`min_coverage` of its n-grams, as PaLM counted contamination (70% of an example's n-grams;
Chowdhery et al. 2022); `min_coverage` near 0 gives GPT-3's any-overlap rule. An n-gram that
occurs in more than `max_items` evaluation items is template text ("How much money does ...
have left?"), not a sign that any one item leaked, and is left out of the index.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError
from lmforge.data.readers import read_records
from lmforge.data.text import stable_hash, units


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item: its set (the spec it came from), position and text."""

    source: str
    index: int
    text: str


def parse_spec(spec: str) -> tuple[Path, str]:
    """ "PATH:FIELD" -> (path, field); the field is the part after the last colon."""
    path, sep, field = spec.rpartition(":")
    if not sep or not path or not field:
        raise ConfigError(
            f"clean.eval_sets: {spec!r} must be PATH:FIELD, e.g. gsm8k.jsonl:question"
        )
    return Path(path), field


def load_eval_items(specs: list[str]) -> list[EvalItem]:
    """Every item of every evaluation set; a record without a string `field` is an error."""
    items = []
    for spec in specs:
        path, field = parse_spec(spec)
        for i, (where, record) in enumerate(read_records(path)):
            text = record.get(field)
            if not isinstance(text, str):
                raise ConfigError(f"{where}: evaluation record needs a string field {field!r}")
            items.append(EvalItem(spec, i, text))
    return items


def _grams(toks: list[str], n: int) -> list[int]:
    return [stable_hash(" ".join(toks[i : i + n])) for i in range(len(toks) - n + 1)]


class NgramIndex:
    """The item-specific n-grams of a list of evaluation items (an item shorter than n
    units is one n-gram of its own length, as GPT-3 did)."""

    def __init__(self, items: list[EvalItem], n: int, max_items: int, min_coverage: float) -> None:
        self.n = n
        self.min_coverage = min_coverage
        owners: dict[tuple[int, int], set[int]] = defaultdict(set)  # (length, hash) -> items
        for k, item in enumerate(items):
            toks = units(item.text)
            size = min(n, len(toks))
            for g in _grams(toks, size) if size else []:
                owners[size, g].add(k)
        self.index = {key: ks for key, ks in owners.items() if len(ks) <= max_items}
        self.sizes = sorted({size for size, _ in self.index})
        self.grams_per_item: dict[int, int] = defaultdict(int)
        for ks in self.index.values():
            for k in ks:
                self.grams_per_item[k] += 1

    def matches(self, text: str) -> tuple[set[int], set[int]]:
        """(the items of which `text` holds at least `min_coverage` of the n-grams, the
        lines of `text` that hold those n-grams)."""
        toks: list[str] = []
        line_of: list[int] = []
        for j, line in enumerate(text.split("\n")):
            u = units(line)
            toks += u
            line_of += [j] * len(u)
        seen: dict[int, set[int]] = defaultdict(set)  # item -> its n-grams found
        where: dict[int, set[int]] = defaultdict(set)  # item -> lines
        for size in self.sizes:
            for i, g in enumerate(_grams(toks, size)):
                for k in self.index.get((size, g), ()):
                    seen[k].add(g)
                    where[k].update(line_of[i : i + size])
        found = {
            k for k, gs in seen.items() if len(gs) >= self.min_coverage * self.grams_per_item[k]
        }
        return found, set().union(*(where[k] for k in found))


def decontaminate(doc: dict[str, Any], lines: set[int], mode: str) -> dict[str, Any] | str:
    """Drop a document that overlaps an evaluation item, or (mode "redact") cut the lines
    that hold the overlap; a document with nothing left is dropped."""
    if not lines:
        return doc
    if mode == "drop":
        return "decontam:eval_overlap"
    kept = [line for j, line in enumerate(doc["text"].split("\n")) if j not in lines]
    text = "\n".join(kept).strip()
    return {**doc, "text": text} if text else "decontam:eval_overlap"
