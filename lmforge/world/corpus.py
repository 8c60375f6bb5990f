"""The raw pretraining corpus (clean documents plus labelled noise) and held-out text.

`noise_fraction` is the share of noise among the non-ad documents of each language,
spread evenly over the eight shared noise kinds (each gets at least one document when the
fraction is positive); the advertisement comes on top, `ad_copies` times per language.
"""

from __future__ import annotations

import random

from lmforge.config import WorldConfig

from .arithmetic import Problem, problem_sets
from .documents import (
    CLEAN_LICENSES,
    HOST,
    atlas_doc,
    atlas_groups,
    bio_doc,
    clean_documents,
    fact_doc,
    fresh_text,
)
from .entities import World, rng_for
from .noise import (
    AD_TEXT,
    BAD_LICENSES,
    SHARED_KINDS,
    contamination,
    gibberish,
    harmful,
    html_page,
    low_quality,
    mojibake_doc,
    near_duplicate,
)
from .stories import story

_NOISE_SOURCES = {
    "html": ("web/wiki", "https://wiki.lmforge.local/{lang}/page/{k:05d}"),
    "ad": ("web/ads", "https://ads.lmforge.local/{lang}/offer/{k:05d}"),
    "near_duplicate": ("web/mirror", "https://mirror.lmforge.local/{lang}/{k:05d}"),
    "gibberish": ("web/crawl", "https://random.lmforge.local/{lang}/{k:05d}"),
    "low_quality": ("web/crawl", "https://spam.lmforge.local/{lang}/{k:05d}"),
    "harmful": ("web/forum", "https://forum.lmforge.local/{lang}/thread/{k:05d}"),
    "bad_license": ("books/publisher", "https://publisher.lmforge.local/{lang}/book/{k:05d}"),
    "contamination": ("web/quiz", "https://quiz.lmforge.local/{lang}/{k:05d}"),
    "mojibake": ("web/legacy", "https://legacy.lmforge.local/{lang}/{k:05d}"),
}


def noise_counts(n_clean: int, cfg: WorldConfig) -> dict[str, int]:
    """Documents per shared noise kind for `n_clean` clean documents of one language."""
    f = cfg.noise_fraction
    if f <= 0 or n_clean == 0:
        return dict.fromkeys(SHARED_KINDS, 0)
    total = max(len(SHARED_KINDS), round(f * n_clean / (1 - f)))
    base, extra = divmod(total, len(SHARED_KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(SHARED_KINDS)}


def _fresh(world: World, lang: str, rng: random.Random, seen: set[str]) -> str:
    """A clean text not seen before (so a cleaned-up noise document is not a duplicate)."""
    for _ in range(100):
        text = fresh_text(world, lang, rng)
        if text not in seen:
            seen.add(text)
            return text
    raise RuntimeError("could not draw a fresh clean text; the world is too small")


def noise_documents(
    world: World,
    cfg: WorldConfig,
    lang: str,
    clean: list[dict],
    eval_problems: list[Problem],
    seen: set[str],
) -> list[dict]:
    """The noise documents of one language, each labelled with its kind."""
    rng = rng_for(cfg.seed, "noise", lang)
    docs: list[dict] = []

    def add(kind: str, text: str, license: str | None = None) -> None:
        source, url = _NOISE_SOURCES[kind]
        docs.append(
            {
                "text": text,
                "source": source,
                "url": url.format(lang=lang, k=len(docs)),
                "license": license or rng.choice(CLEAN_LICENSES),
                "lang": lang,
                "noise": kind,
            }
        )

    counts = noise_counts(len(clean), cfg)
    if not eval_problems:
        counts["contamination"] = 0
    for _ in range(cfg.ad_copies):
        add("ad", AD_TEXT[lang])
    for _ in range(counts["html"]):
        add("html", html_page(_fresh(world, lang, rng, seen), rng))
    for _ in range(counts["near_duplicate"]):
        original = rng.choice(clean)
        text = near_duplicate(original["text"], lang, rng)
        if text == original["text"]:
            text += "\n" + ("(reposted)" if lang == "en" else "（转载）")
        add("near_duplicate", text, original["license"])
    for _ in range(counts["gibberish"]):
        add("gibberish", gibberish(lang, rng))
    for _ in range(counts["low_quality"]):
        add("low_quality", low_quality(lang, rng))
    for _ in range(counts["harmful"]):
        add("harmful", harmful(lang, rng))
    for _ in range(counts["bad_license"]):
        add("bad_license", _fresh(world, lang, rng, seen), rng.choice(BAD_LICENSES))
    # Contamination walks through the evaluation problems in order, 1-3 per page.
    cursor = 0
    for _ in range(counts["contamination"]):
        n = min(rng.randint(1, 3), len(eval_problems))
        chosen = [eval_problems[(cursor + i) % len(eval_problems)] for i in range(n)]
        cursor += n
        add("contamination", contamination(chosen, lang, rng))
    for _ in range(counts["mojibake"]):
        add("mojibake", mojibake_doc(_fresh(world, lang, rng, seen), lang))
    return docs


def _build(
    world: World, cfg: WorldConfig
) -> tuple[list[dict], dict[str, dict[str, list[Problem]]]]:
    sets = problem_sets(world, cfg)
    seen: set[str] = set()
    docs: list[dict] = []
    for lang in cfg.languages:
        clean = clean_documents(world, cfg, lang, sets[lang]["train"], seen)
        docs += clean
        docs += noise_documents(world, cfg, lang, clean, sets[lang]["eval"], seen)
    rng_for(cfg.seed, "shuffle").shuffle(docs)
    return docs, sets


def pretraining_documents(world: World, cfg: WorldConfig) -> list[dict]:
    """The raw pretraining corpus: `{"text", "source", "url", "license", "lang", "noise"}`
    per document, `noise` None for clean documents, else its kind; shuffled (seeded)."""
    return _build(world, cfg)[0]


HELDOUT_MIX = (
    ("facts", 0.3),
    ("atlas", 0.15),
    ("people", 0.1),
    ("stories", 0.3),
    ("arithmetic", 0.15),
)


def heldout_documents(world: World, cfg: WorldConfig) -> list[dict]:
    """`heldout_docs` fresh clean documents per language, from the same world and templates
    as the corpus but none of its texts: for tokenizer compression and validation loss."""
    corpus, sets = _build(world, cfg)
    seen = {d["text"] for d in corpus}
    kinds = [k for k, _ in HELDOUT_MIX if k != "people" or world.people]
    weights = [w for k, w in HELDOUT_MIX if k in kinds]
    out: list[dict] = []
    for lang in cfg.languages:
        rng = rng_for(cfg.seed, "heldout", lang)
        problems = iter(sets[lang]["heldout"])
        for k in range(cfg.heldout_docs if world.countries else 0):
            text = None
            for _ in range(100):
                kind = rng.choices(kinds, weights)[0]
                if kind == "facts":
                    text = fact_doc(world, rng.choice(world.countries), lang, rng)
                elif kind == "atlas":
                    group = atlas_groups(world, 1, rng)[0]
                    text = atlas_doc(world, group, lang, rng)
                elif kind == "people":
                    text = bio_doc(world, rng.choice(world.people), lang, rng)
                elif kind == "stories":
                    text = story(world, lang, rng)
                else:
                    text = next(problems).text()
                if text not in seen:
                    break
            else:
                raise RuntimeError("could not draw fresh held-out text; the world is too small")
            seen.add(text)
            out.append(
                {
                    "text": text,
                    "source": f"world/{kind}",
                    "url": f"{HOST}/{lang}/heldout/{k:05d}",
                    "license": rng.choice(CLEAN_LICENSES),
                    "lang": lang,
                    "noise": None,
                }
            )
    return out
