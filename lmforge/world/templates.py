"""Sentence templates: how each fact is said, in English and Chinese.

The first template of every fact is its *canonical* phrasing: the exact sentence whose start
is a probe prompt (`probes.py`) and which the corpus repeats most often. Keeping both in one
place guarantees that every probe is answerable from the text the model is trained on.

Templates are filled with `str.format(**slots)`; the slots of a country fact are `country`,
`capital`, `river`, `founded`, `population`, `language`, and those of a person fact are
`name`, `profession`, `birth_year`, `country`, `capital`.
"""

from __future__ import annotations

from .entities import Country, Person, World

# kind -> lang -> [canonical, paraphrase, ...]
COUNTRY_FACTS: dict[str, dict[str, list[str]]] = {
    "capital": {
        "en": [
            "The capital of {country} is {capital}.",
            "{capital} is the capital of {country}.",
            "The capital city of {country} is {capital}.",
            "{country}'s capital is {capital}.",
            "The government of {country} sits in {capital}, the capital.",
            "{capital}, the capital of {country}, is a busy city.",
        ],
        "zh": [
            "{country}的首都是{capital}。",
            "{capital}是{country}的首都。",
            "{country}的首都叫{capital}。",
            "{country}政府设在首都{capital}。",
            "{capital}是{country}的首都，也是一座繁忙的城市。",
        ],
    },
    "river": {
        "en": [
            "The largest river of {country} is the {river}.",
            "{country}'s largest river is the {river}.",
            "The {river} is the largest river in {country}.",
            "The {river} flows through {country}; it is the country's largest river.",
        ],
        "zh": [
            "{country}最大的河流是{river}。",
            "{river}是{country}最大的河流。",
            "{river}流经{country}，是这个国家最大的河流。",
        ],
    },
    "founded": {
        "en": [
            "{country} was founded in {founded}.",
            "The country of {country} was founded in the year {founded}.",
            "In {founded}, {country} was founded.",
            "{country} has existed since it was founded in {founded}.",
        ],
        "zh": [
            "{country}建于{founded}年。",
            "{country}成立于{founded}年。",
            "{founded}年，{country}建立了。",
        ],
    },
    "population": {
        "en": [
            "The population of {country} is {population}.",
            "{country} has a population of {population} people.",
            "About {population} people live in {country}.",
        ],
        "zh": [
            "{country}的人口是{population}。",
            "{country}约有{population}人。",
            "{country}有{population}名居民。",
        ],
    },
    "language": {
        "en": [
            "The official language of {country} is {language}.",
            "People in {country} speak {language}.",
            "{language} is the official language of {country}.",
        ],
        "zh": [
            "{country}的官方语言是{language}。",
            "{country}人说{language}。",
            "{language}是{country}的官方语言。",
        ],
    },
}

PERSON_FACTS: dict[str, dict[str, list[str]]] = {
    "profession": {
        "en": [
            "{name} works as a {profession}.",
            "{name} is a {profession} from {country}.",
            "As a {profession}, {name} is well known in {capital}.",
        ],
        "zh": [
            "{name}的职业是{profession}。",
            "{name}是一位{profession}，来自{country}。",
            "作为一名{profession}，{name}在{capital}很有名。",
        ],
    },
    "birth_year": {
        "en": [
            "{name} was born in {birth_year}.",
            "Born in {birth_year}, {name} grew up in {country}.",
            "{name}'s year of birth is {birth_year}.",
        ],
        "zh": [
            "{name}出生于{birth_year}年。",
            "{birth_year}年，{name}出生在{country}。",
            "{name}是{birth_year}年出生的。",
        ],
    },
    "home": {
        "en": [
            "{name} comes from {country}.",
            "{name} lives in {capital}, the capital of {country}.",
            "{name} grew up in {country}.",
        ],
        "zh": [
            "{name}来自{country}。",
            "{name}住在{country}的首都{capital}。",
            "{name}在{country}长大。",
        ],
    },
}

# The probe for each kind: the canonical sentence cut right before the answer.
# lang -> kind -> (prompt template, answer template)
PROBES: dict[str, dict[str, tuple[str, str]]] = {
    "en": {
        "capital": ("The capital of {country} is", "{capital}"),
        "river": ("The largest river of {country} is the", "{river}"),
        "founded": ("{country} was founded in", "{founded}"),
        "language": ("The official language of {country} is", "{language}"),
        "profession": ("{name} works as a", "{profession}"),
        "birth_year": ("{name} was born in", "{birth_year}"),
    },
    # In Chinese a year or unit follows the number directly ("1342年"), so it is part of the
    # answer: a completion is judged up to the next non-alphanumeric character.
    "zh": {
        "capital": ("{country}的首都是", "{capital}"),
        "river": ("{country}最大的河流是", "{river}"),
        "founded": ("{country}建于", "{founded}年"),
        "language": ("{country}的官方语言是", "{language}"),
        "profession": ("{name}的职业是", "{profession}"),
        "birth_year": ("{name}出生于", "{birth_year}年"),
    },
}

SEP = {"en": " ", "zh": ""}  # between a prompt and its answer


def country_slots(country: Country, lang: str) -> dict[str, str]:
    """The values a country template is filled with."""
    return {
        "country": country.name[lang],
        "capital": country.capital[lang],
        "river": country.river[lang],
        "founded": str(country.founded),
        "population": str(country.population),
        "language": country.language[lang],
    }


def person_slots(world: World, person: Person, lang: str) -> dict[str, str]:
    """The values a person template is filled with (including their home country)."""
    home = world.home(person)
    return {
        "name": person.name[lang],
        "profession": person.profession[lang],
        "birth_year": str(person.birth_year),
        "country": home.name[lang],
        "capital": home.capital[lang],
    }


def canonical(kind: str, lang: str, slots: dict[str, str]) -> str:
    """The canonical sentence of a country or person fact."""
    table = COUNTRY_FACTS if kind in COUNTRY_FACTS else PERSON_FACTS
    return table[kind][lang][0].format(**slots)


def capital_sentence(country: Country, lang: str) -> str:
    """The canonical capital sentence, e.g. "The capital of Tavori is Mosun." / "塔沃里的首都是莫苏恩。"."""
    return canonical("capital", lang, country_slots(country, lang))
