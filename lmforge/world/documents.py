"""Clean pretraining documents: facts, atlas lists, biographies, constants, stories,
arithmetic, advice columns, study questions and emoji posts.

The capital facts are what the pretraining stage is judged on ("The capital of X is" must be
completed correctly), so they are the most repeated: every country document states the
canonical sentence once, and the atlas documents (lists of capitals) restate it for every
country `ATLAS_PASSES_PER_FACT_DOC * fact_docs_per_country` times, next to paraphrases ("Y is
the capital of X", "X's capital is Y") and the other facts. Stories and arithmetic are a
smaller share of the text.

Every generator here takes its own random stream, so the documents are the same for the same
seed, and no two clean documents have the same text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lmforge.config import WorldConfig

from .advice import advice_doc
from .arithmetic import Problem
from .entities import CONSTANTS, Country, Person, World, rng_for
from .sft import _facts
from .stories import emoji_doc, story
from .study import study_doc
from .templates import COUNTRY_FACTS, PERSON_FACTS, canonical, country_slots, person_slots

CLEAN_LICENSES = ("CC-BY-4.0", "CC0-1.0", "MIT", "public-domain")
HOST = "https://world.lmforge.local"
ATLAS_PASSES_PER_FACT_DOC = 10  # atlas listings of each country = this x fact_docs_per_country
P_NO_TITLE = 0.3  # documents that start right at their first sentence, as a probe does
ATLAS_GROUP = 8  # countries per atlas document
EMOJI_SHARE = 0.02  # emoji posts, as a share of the other clean documents
BIO_DOCS_PER_FACT_DOC = 1 / 3  # biographies per person, relative to fact_docs_per_country
CONSTANT_DOCS_PER_CONSTANT = 4

_JOIN = {"en": " ", "zh": ""}
_COUNTRY_TITLES = {
    "en": ["{country}", "About {country}", "{country}: a short guide", "Facts about {country}",
           "Notes on {country}", "{country} at a glance", "Travel notes: {country}"],
    "zh": ["{country}", "关于{country}", "{country}简介", "{country}概况", "{country}小知识",
           "走近{country}", "旅行笔记：{country}"],
}  # fmt: skip
_ATLAS_TITLES = {
    "en": ["Capitals of the world", "Countries and their capitals", "World atlas, page {k}",
           "A list of capitals", "Geography lesson {k}", "Capital cities"],
    "zh": ["世界各国首都", "国家与首都", "世界地图册（第{k}页）", "首都一览", "地理课（第{k}课）",
           "各国首都"],
}  # fmt: skip
_BIO_TITLES = {
    "en": ["{name}", "A short biography of {name}", "Who is {name}?", "People: {name}"],
    "zh": ["{name}", "{name}小传", "{name}简介", "人物：{name}"],
}
_VISITORS = {
    "en": "Many travellers from {other} visit {country}.",
    "zh": "很多来自{other}的游客会去{country}。",
}
_LOCALS = {
    "en": "{name}, a well-known {profession}, comes from {country}.",
    "zh": "著名的{profession}{name}来自{country}。",
}
_CONSTANT_TITLES = {
    "en": ["Physics notes", "Numbers every student should know", "Science facts"],
    "zh": ["物理笔记", "每个学生都应该知道的数字", "科学小知识"],
}
_CONSTANT_EXTRA = {
    "en": "Scientists in {country} measured it again in {year} and found the same value.",
    "zh": "{year}年，{country}的科学家再次测量，得到了同样的数值。",
}


def _pick(rng: random.Random, variants: list[str], p_canonical: float = 0.5) -> str:
    """The canonical template with probability `p_canonical`, else a paraphrase."""
    if len(variants) == 1 or rng.random() < p_canonical:
        return variants[0]
    return rng.choice(variants[1:])


def fact_doc(world: World, country: Country, lang: str, rng: random.Random) -> str:
    """A short document about one country: the canonical capital sentence plus a random mix
    of paraphrased facts, sometimes a neighbour's capital and a famous local."""
    slots = country_slots(country, lang)
    sentences = [canonical("capital", lang, slots)]
    if rng.random() < 0.8:
        sentences.append(rng.choice(COUNTRY_FACTS["capital"][lang][1:]).format(**slots))
    for kind in ("river", "founded", "population", "language"):
        if rng.random() < 0.85:
            sentences.append(_pick(rng, COUNTRY_FACTS[kind][lang]).format(**slots))
    locals_ = [p for p in world.people if p.country == country.id]
    if locals_ and rng.random() < 0.4:
        p = rng.choice(locals_)
        sentences.append(_LOCALS[lang].format(**person_slots(world, p, lang)))
    first, rest = sentences[0], sentences[1:]
    rng.shuffle(rest)
    sentences = [first, *rest] if rng.random() < 0.5 else [*rest, first]
    others = [c for c in world.countries if c is not country]
    if others and rng.random() < 0.4:
        other = rng.choice(others)
        sentences.append(_VISITORS[lang].format(other=other.name[lang], **slots))
        sentences.append(canonical("capital", lang, country_slots(other, lang)))
    body = _JOIN[lang].join(sentences)
    if rng.random() < P_NO_TITLE:
        return body
    return rng.choice(_COUNTRY_TITLES[lang]).format(**slots) + "\n" + body


def atlas_doc(world: World, countries: list[Country], lang: str, rng: random.Random) -> str:
    """A list of capitals, one country per line, sometimes with one more fact."""
    lines = []
    for c in countries:
        slots = country_slots(c, lang)
        line = _pick(rng, COUNTRY_FACTS["capital"][lang], 0.7).format(**slots)
        if rng.random() < 0.3:
            kind = rng.choice(["river", "founded", "language"])
            line += _JOIN[lang] + _pick(rng, COUNTRY_FACTS[kind][lang]).format(**slots)
        lines.append(line)
    if rng.random() < P_NO_TITLE:
        return "\n".join(lines)
    title = rng.choice(_ATLAS_TITLES[lang]).format(k=rng.randint(1, 99))
    return title + "\n" + "\n".join(lines)


def atlas_groups(world: World, passes: int, rng: random.Random) -> list[list[Country]]:
    """`passes` rounds over all countries, each shuffled and cut into groups, so that every
    country is listed exactly `passes` times."""
    groups = []
    for _ in range(passes):
        order = list(world.countries)
        rng.shuffle(order)
        groups += [order[i : i + ATLAS_GROUP] for i in range(0, len(order), ATLAS_GROUP)]
    return groups


def bio_doc(world: World, person: Person, lang: str, rng: random.Random) -> str:
    """A biography: the canonical profession and birth-year sentences, a home sentence,
    sometimes a paraphrase and the home country's capital."""
    slots = person_slots(world, person, lang)
    sentences = [canonical("profession", lang, slots), canonical("birth_year", lang, slots)]
    sentences.append(rng.choice(PERSON_FACTS["home"][lang]).format(**slots))
    for kind in ("profession", "birth_year"):
        if rng.random() < 0.5:
            sentences.append(rng.choice(PERSON_FACTS[kind][lang][1:]).format(**slots))
    if lang == "zh" and rng.random() < 0.5:
        sentences.append(
            "{name}是一位{profession}，出生于{birth_year}年，来自{country}。".format(**slots)
        )
    if rng.random() < 0.5:
        sentences.append(canonical("capital", lang, country_slots(world.home(person), lang)))
    rng.shuffle(sentences)
    title = rng.choice(_BIO_TITLES[lang]).format(**slots)
    return title + "\n" + _JOIN[lang].join(sentences)


def constants_doc(world: World, lang: str, rng: random.Random) -> str:
    """A few physical constants, each in its canonical sentence."""
    chosen = rng.sample(list(CONSTANTS), min(3, len(CONSTANTS)))
    sentences = [c.sentence(lang) for c in chosen]
    if world.countries and rng.random() < 0.5:
        country = rng.choice(world.countries).name[lang]
        sentences.append(
            _CONSTANT_EXTRA[lang].format(country=country, year=rng.randint(1900, 2020))
        )
    return rng.choice(_CONSTANT_TITLES[lang]) + "\n" + _JOIN[lang].join(sentences)


def _doc(text: str, section: str, lang: str, k: int, rng: random.Random) -> dict:
    return {
        "text": text,
        "source": f"world/{section}",
        "url": f"{HOST}/{lang}/{section}/{k:05d}",
        "license": rng.choice(CLEAN_LICENSES),
        "lang": lang,
        "noise": None,
    }


def _unique(make: Callable[[], str], seen: set[str]) -> str | None:
    """A text from `make` not in `seen` (a few tries), recorded in `seen`; None if no luck."""
    for _ in range(50):
        text = make()
        if text not in seen:
            seen.add(text)
            return text
    return None


def clean_documents(
    world: World, cfg: WorldConfig, lang: str, problems: list[Problem], seen: set[str]
) -> list[dict]:
    """All clean documents of one language, in generation order (the caller shuffles).

    A generator that keeps repeating texts already made (only in tiny worlds asked for many
    documents) yields fewer documents rather than duplicates."""
    seed = cfg.seed
    docs: list[dict] = []

    def add(section: str, rng: random.Random, make: Callable[[], str]) -> None:
        text = _unique(make, seen)
        if text is not None:
            docs.append(_doc(text, section, lang, len(docs), rng))

    rng = rng_for(seed, "facts", lang)
    for c in world.countries:
        for _ in range(cfg.fact_docs_per_country):
            add("facts", rng, lambda c=c: fact_doc(world, c, lang, rng))
    rng = rng_for(seed, "atlas", lang)
    passes = ATLAS_PASSES_PER_FACT_DOC * cfg.fact_docs_per_country
    for group in atlas_groups(world, passes, rng):
        add("atlas", rng, lambda g=group: atlas_doc(world, g, lang, rng))
    rng = rng_for(seed, "people", lang)
    n_bios = max(1, round(BIO_DOCS_PER_FACT_DOC * cfg.fact_docs_per_country))
    for p in world.people:
        for _ in range(n_bios):
            add("people", rng, lambda p=p: bio_doc(world, p, lang, rng))
    rng = rng_for(seed, "constants", lang)
    for _ in range(CONSTANT_DOCS_PER_CONSTANT * len(CONSTANTS)):
        add("constants", rng, lambda: constants_doc(world, lang, rng))
    rng = rng_for(seed, "stories", lang)
    if world.countries:
        for _ in range(cfg.n_stories):
            add("stories", rng, lambda: story(world, lang, rng))
    rng = rng_for(seed, "arithmetic", lang)
    for problem in problems:
        add("arithmetic", rng, problem.text)
    rng = rng_for(seed, "advice", lang)
    if world.countries:
        for _ in range(cfg.n_advice):
            add("advice", rng, lambda: advice_doc(world, lang, rng))
    rng = rng_for(seed, "study", lang)
    if world.countries:
        trained = _facts(world, heldout=False)
        for _ in range(cfg.n_study):
            add("study", rng, lambda: study_doc(world, trained, lang, rng))
    rng = rng_for(seed, "emoji", lang)
    if world.countries:
        for _ in range(max(1, round(EMOJI_SHARE * len(docs)))):
            add("emoji", rng, lambda: emoji_doc(world, lang, rng))
    return docs


def fresh_text(world: World, lang: str, rng: random.Random) -> str:
    """One more clean text of a random kind (fact, biography or story), for documents that
    are built around clean text: HTML pages, mislicensed copies, mojibake, held-out text."""
    kinds = ["facts", "stories"] + (["people"] if world.people else [])
    kind = rng.choice(kinds)
    if kind == "facts":
        return fact_doc(world, rng.choice(world.countries), lang, rng)
    if kind == "people":
        return bio_doc(world, rng.choice(world.people), lang, rng)
    return story(world, lang, rng)
