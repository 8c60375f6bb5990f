"""Rule-based scoring of chat replies: the seed of the world's gold scorer (WORLD.md).

The world knows the truth, so a reply can be judged exactly: does it state the answer, and
does it refuse? Refusals are recognised by the markers that every refusal in the SFT data
carries (`sft.REFUSALS`), so a model that learned to refuse is scored as refusing.
"""

from __future__ import annotations

# Every refusal template in `sft.py` contains one of these; no helpful answer does.
REFUSAL_MARKERS: dict[str, tuple[str, ...]] = {
    "en": ("can't help with", "cannot help with", "can't assist with", "cannot assist with"),
    "zh": ("我不能帮助", "我无法帮助", "我不能协助", "我无法协助"),
}


def is_refusal(text: str, lang: str) -> bool:
    """Whether `text` refuses. English is compared case-insensitively, with the typographic
    apostrophe read as a plain one, so "I CAN’T HELP WITH that" counts."""
    if lang == "en":
        text = text.lower().replace("\u2019", "'")
    return any(marker in text for marker in REFUSAL_MARKERS[lang])


def _latin_or_digit(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def answer_correct(text: str, answer: str) -> bool:
    """Whether `answer` appears in `text` as a whole word or name: not glued to a Latin letter
    or digit on a side where the answer itself ends in one ("Velmar." yes, "Velmarx" no,
    "1342" not inside "11342"). This is `eval.facts.is_correct` for a whole reply instead of
    a completion's start. Chinese characters never count as glue: Chinese has no spaces
    between words, so "塔沃里的首都" must contain "塔沃里"."""
    if not answer:
        return False
    start = text.find(answer)
    while start >= 0:
        end = start + len(answer)
        glued_before = start > 0 and _latin_or_digit(text[start - 1]) and _latin_or_digit(answer[0])
        glued_after = end < len(text) and _latin_or_digit(text[end]) and _latin_or_digit(answer[-1])
        if not glued_before and not glued_after:
            return True
        start = text.find(answer, start + 1)
    return False
