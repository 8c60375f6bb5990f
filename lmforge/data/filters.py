"""Per-document cleaning filters: each a small pure function over one document.

A filter takes a document (a dict with at least "text") and returns either the document,
possibly with a repaired text, or a string: the reason it is dropped ("quality:stop_words").
`build_filters` turns a `CleanConfig` into the ordered list the clean stage runs; each entry
is picklable (a module function with its settings bound), so worker processes can run it.

None of these looks at the world's `noise` label: that label exists only to score them.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from lmforge.config import CleanConfig
from lmforge.data.text import cjk_fraction, normalize, units

Doc = dict[str, Any]
Filter = Callable[[Doc], "Doc | str"]

# ---- HTML to text ------------------------------------------------------------------------------
_HTML = re.compile(r"^\s*(<!doctype html|<html\b|<head\b|<body\b)", re.IGNORECASE)


def looks_like_html(text: str) -> bool:
    """A whole web page (not a text that merely mentions a tag)."""
    return bool(_HTML.match(text[:1000]))


def html_to_text(doc: Doc) -> Doc | str:
    """The main text of a web page (resiliparse): navigation, scripts, styles, sidebars and
    footers go; paragraphs stay, one per line. Other documents pass unchanged."""
    if not looks_like_html(doc["text"]):
        return doc
    from resiliparse.extract.html2text import extract_plain_text

    text = extract_plain_text(doc["text"], main_content=True, alt_texts=False, links=False)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "html:no_main_text"
    return {**doc, "text": "\n".join(lines)}


# ---- Unicode -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _ftfy_config():
    import ftfy

    # Curly quotes and full-width Chinese punctuation are correct text, not damage: keep them.
    return ftfy.TextFixerConfig(
        uncurl_quotes=False, fix_character_width=False, unescape_html=False, normalization="NFC"
    )


# "â€" left over once a decoder has dropped the third byte of ” (E2 80 9D: Windows-1252
# leaves 9D undefined), as in TinyStories: what follows is not a byte that could end it.
_LOST_RIGHT_QUOTE = re.compile("â€(?![\x80-\xbf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ])")


def fix_unicode(doc: Doc) -> Doc:
    """Mojibake repaired ("cafÃ©" -> "café", "â€™" -> "’") and NFC, with ftfy; a right
    quote whose last byte was lost ("he said.â€") is restored too. Emoji, curly quotes and
    full-width punctuation are kept as they are."""
    import ftfy

    text = ftfy.fix_text(_LOST_RIGHT_QUOTE.sub("”", doc["text"]), _ftfy_config())
    return doc if text == doc["text"] else {**doc, "text": text}


# ---- licence -----------------------------------------------------------------------------------
def license_allowlist(doc: Doc, allowed: frozenset[str], missing: str) -> Doc | str:
    """Keep documents whose `license` is on the allowlist (case-insensitive); documents
    without one follow the explicit policy `missing` ("keep" or "drop")."""
    license = doc.get("license")
    if not license:
        return doc if missing == "keep" else "license:missing"
    return doc if str(license).casefold() in allowed else "license:not_allowed"


# ---- language ----------------------------------------------------------------------------------
# langid labels dialects separately; they count towards their language.
_DIALECTS = {"wuu": "zh", "yue": "zh"}


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_score(text: str, allowed: tuple[str, ...]) -> dict[str, float]:
    """langid's probability (its model ships inside the package) of each allowed language,
    its dialects included."""
    probs = dict(_identifier().rank(text))
    scores = {lang: probs.get(lang, 0.0) for lang in allowed}
    for dialect, lang in _DIALECTS.items():
        if lang in scores:
            scores[lang] += probs.get(dialect, 0.0)
    return scores


def language(doc: Doc, allowed: tuple[str, ...], min_score: float) -> Doc | str:
    """Keep documents that are, with probability >= `min_score`, in an allowed language;
    the most probable allowed language is written to `lang`. The probability of all allowed
    languages together counts, so a short text that langid half attributes to a related
    language (Nigerian Pidgin for English) is kept, while random letters are not."""
    scores = language_score(doc["text"], allowed)
    if sum(scores.values()) < min_score:
        return "language:not_allowed"
    best = max(allowed, key=scores.__getitem__)
    return doc if doc.get("lang") == best else {**doc, "lang": best}


# ---- harmful content ---------------------------------------------------------------------------
def harmful(
    doc: Doc,
    phrases: tuple[str, ...],
    classifier: Callable[[str], float] | None = None,
    threshold: float = 0.5,
) -> Doc | str:
    """Drop documents that contain a listed phrase (matched on normalised text, every
    language's list at once), or that the optional classifier scores >= `threshold`."""
    text = normalize(doc["text"])
    if any(p in text for p in phrases):
        return "harmful:phrase"
    if classifier is not None and classifier(doc["text"]) >= threshold:
        return "harmful:classifier"
    return doc


def load_classifier(spec: str) -> Callable[[str], float]:
    """The function named by "module:function"; it maps a text to P(harmful)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        from lmforge.config import ConfigError

        raise ConfigError(f"clean.harmful_classifier: cannot load {spec!r} ({e})") from None


# ---- quality -----------------------------------------------------------------------------------
_STOP = "the be is are was were been to of and a an in on at for from by with that this it as"
STOP_WORDS = frozenset(
    f"{_STOP} have has had he she they we you i his her their not but or".split()
)


@functools.lru_cache(maxsize=1)
def common_cjk() -> frozenset[str]:
    """The frequent-use Chinese characters of the national standards: GB 2312 level 1
    (3,755 simplified) and Big5 level 1 (5,401 traditional). Prose and classical poetry use
    them almost only; random characters fall mostly outside (about a third of the
    20,902 unified ideographs are in the set)."""
    chars = set()
    for lead in range(0xB0, 0xD8):  # GB 2312 level 1: rows 16-55
        for trail in range(0xA1, 0xFF):
            chars.add(bytes([lead, trail]).decode("gb2312", errors="ignore"))
    for lead in range(0xA4, 0xC7):  # Big5 level 1: A440-C67E
        for trail in (*range(0x40, 0x7F), *range(0xA1, 0xFF)):
            if (lead, trail) <= (0xC6, 0x7E):
                chars.add(bytes([lead, trail]).decode("big5", errors="ignore"))
    chars.discard("")
    return frozenset(chars)


TERMINAL = tuple(".!?。！？…\"'”’」』)）;；")
_TRAILING_SYMBOLS = re.compile(r"[\s\u200d\ufe0f\U0001f000-\U0001faff\u2600-\u27bf]+$")


def ends_sentence(line: str) -> bool:
    """Whether `line` ends in terminal punctuation; emoji after it ("fun! 😊") are ignored."""
    return _TRAILING_SYMBOLS.sub("", line).endswith(TERMINAL)


def quality_reason(text: str, cfg: CleanConfig) -> str | None:
    """The first Gopher/C4-style rule `text` fails, or None. Chinese (mostly CJK) text is
    measured in characters, and instead of English stop words it needs common characters."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    cjk = cjk_fraction(text) >= 0.3
    words = units(text) if cjk else text.split()
    if len(words) < (cfg.cjk_min_chars if cjk else cfg.min_words):
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    if cjk:
        han = [w for w in words if "\u3400" <= w <= "\u9fff"]  # ideographs, not kana or digits
        if sum(c in common_cjk() for c in han) < cfg.cjk_min_common * len(han):
            return "rare_chars"
    else:
        mean = sum(len(w) for w in words) / len(words)
        if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
            return "mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / len(words) > cfg.max_symbol_ratio:
            return "symbol_ratio"
        if sum(any(c.isalpha() for c in w) for w in words) / len(words) < cfg.min_alpha_words:
            return "alpha_words"
        bare = (w.strip(".,;:!?\"'()").casefold() for w in words)
        if sum(w in STOP_WORDS for w in bare) < cfg.min_stop_words:
            return "stop_words"
    if sum(ends_sentence(line) for line in lines) / len(lines) < cfg.min_punct_lines:
        return "punctuation_lines"
    seen: set[str] = set()
    dup = 0
    for line in lines:
        dup += line in seen
        seen.add(line)
    if dup / len(lines) > cfg.max_dup_lines:
        return "duplicate_lines"
    # repetition, in chars covered by repeated n-grams; a Chinese word is ~2 characters
    tokens = words if cjk else units(text)
    n_top, n_dup = (6, 10) if cjk else (3, 5)
    total = sum(len(t) for t in tokens)
    if len(tokens) > n_dup and total:
        grams = Counter(tuple(tokens[i : i + n_top]) for i in range(len(tokens) - n_top + 1))
        top, count = grams.most_common(1)[0]
        if count > 1 and count * sum(len(t) for t in top) / total > cfg.max_top_ngram:
            return "top_ngram"
        starts = [tuple(tokens[i : i + n_dup]) for i in range(len(tokens) - n_dup + 1)]
        counts = Counter(starts)
        covered = [False] * len(tokens)
        for i, gram in enumerate(starts):
            if counts[gram] > 1:
                covered[i : i + n_dup] = [True] * n_dup
        if sum(len(t) for t, c in zip(tokens, covered) if c) / total > cfg.max_dup_ngram:
            return "duplicate_ngrams"
    return None


def quality(doc: Doc, cfg: CleanConfig) -> Doc | str:
    """Drop documents that fail a quality rule (see `quality_reason`)."""
    reason = quality_reason(doc["text"], cfg)
    return doc if reason is None else f"quality:{reason}"


# ---- assembly ----------------------------------------------------------------------------------
def build_filters(cfg: CleanConfig) -> list[tuple[str, Filter]]:
    """The per-document filters `cfg` turns on, in order: repairs first (HTML, Unicode), so
    that the other filters judge the repaired text."""
    filters: list[tuple[str, Filter]] = []
    if cfg.html:
        filters.append(("html", html_to_text))
    if cfg.fix_unicode:
        filters.append(("unicode", fix_unicode))
    if cfg.licenses:
        allowed = frozenset(x.casefold() for x in cfg.licenses)
        check = functools.partial(license_allowlist, allowed=allowed, missing=cfg.missing_license)
        filters.append(("license", check))
    if cfg.languages:
        languages = tuple(cfg.languages)
        check = functools.partial(language, allowed=languages, min_score=cfg.min_language_score)
        filters.append(("language", check))
    phrases = tuple(normalize(p) for ps in cfg.harmful_phrases.values() for p in ps)
    classifier = load_classifier(cfg.harmful_classifier) if cfg.harmful_classifier else None
    if phrases or classifier:
        threshold = cfg.harmful_threshold
        check = functools.partial(
            harmful, phrases=phrases, classifier=classifier, threshold=threshold
        )
        filters.append(("harmful", check))
    if cfg.quality:
        filters.append(("quality", functools.partial(quality, cfg=cfg)))
    return filters


def apply_filters(doc: Doc, filters: list[tuple[str, Filter]]) -> tuple[Doc | str, list[str]]:
    """Run `filters` over `doc`: (the cleaned document or "filter:reason", the names of the
    filters that changed its text)."""
    changed = []
    for name, f in filters:
        out = f(doc)
        if isinstance(out, str):
            return out, changed
        if out["text"] != doc["text"]:
            changed.append(name)
        doc = out
    return doc, changed
