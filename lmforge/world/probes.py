"""Fact probes: sentence starts that a model which learned the corpus completes correctly.

A probe is the canonical sentence of a fact cut right before the answer ("The capital of
Tavori is" -> "Mosun"). The canonical sentences are in the corpus many times (see
`templates.py`), so every probe is answerable from pretraining text alone. A completion is
judged correct when it starts with the answer followed by a non-alphanumeric character (or
nothing); names are prefix-free, so that test cannot confuse two entities.
"""

from __future__ import annotations

from .entities import World
from .templates import PROBES, SEP, country_slots, person_slots

LANG_ORDER = ("en", "zh")


def fact_probes(world: World, languages: list[str] | tuple[str, ...] = LANG_ORDER) -> list[dict]:
    """Every probe `{"prompt", "answer", "lang", "kind", "subject", "sft_heldout"}`: per
    language, the country kinds (capital, river, founded, language) for every country, the
    person kinds (profession, birth_year) for every person, and every constant. `subject` is
    the entity's name in the probe's language (the constant's key for constants)."""
    probes = []

    def add(lang: str, kind: str, prompt: str, answer: str, subject: str, heldout: bool) -> None:
        probes.append(
            {
                "prompt": prompt,
                "answer": answer,
                "lang": lang,
                "kind": kind,
                "subject": subject,
                "sft_heldout": heldout,
            }
        )

    for lang in languages:
        table = PROBES[lang]
        entities = [
            (c, country_slots(c, lang), ("capital", "river", "founded", "language"))
            for c in world.countries
        ]
        entities += [
            (p, person_slots(world, p, lang), ("profession", "birth_year")) for p in world.people
        ]
        for entity, slots, kinds in entities:
            for kind in kinds:
                prompt, answer = table[kind]
                add(
                    lang,
                    kind,
                    prompt.format(**slots),
                    answer.format(**slots),
                    entity.name[lang],
                    entity.sft_heldout,
                )
        for const in world.constants:
            add(lang, "constant", const.prompt[lang], const.answer(lang), const.key, False)
    return probes


def probe_text(probe: dict) -> str:
    """The probe's prompt followed by its answer, as it reads inside the canonical sentence."""
    return probe["prompt"] + SEP[probe["lang"]] + probe["answer"]
