"""Text units shared by the quality rules, deduplication and decontamination.

Chinese (and Japanese, Korean) has no spaces between words, so a "word" there is one
character: every CJK character is a unit of its own, every run of other letters or digits is
one unit, and punctuation, symbols and emoji are not units. With these units a 13-gram means
the same thing in both languages, and English rules that count words count characters in Chinese.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff"
_UNIT = re.compile(rf"[{CJK}]|[^\W{CJK}]+")
_CJK_CHAR = re.compile(rf"[{CJK}]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: two texts that differ only in width, case
    or spacing normalise to the same string (the key of exact deduplication)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def units(text: str) -> list[str]:
    """The words of `text`, each CJK character a word of its own, punctuation left out."""
    return _UNIT.findall(normalize(text))


def cjk_fraction(text: str) -> float:
    """The share of CJK characters among the non-space characters of `text`."""
    chars = len(text) - text.count(" ") - text.count("\n")
    return len(_CJK_CHAR.findall(text)) / chars if chars > 0 else 0.0


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
