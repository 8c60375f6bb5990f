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
    for lang in languages:
        table = PROBES[lang]
        for c in world.countries:
            slots = country_slots(c, lang)
            for kind in ("capital", "river", "founded", "language"):
                prompt, answer = table[kind]
                probes.append(
                    {
                        "prompt": prompt.format(**slots),
                        "answer": answer.format(**slots),
                        "lang": lang,
                        "kind": kind,
                        "subject": c.name[lang],
                        "sft_heldout": c.sft_heldout,
                    }
                )
        for p in world.people:
            slots = person_slots(world, p, lang)
            for kind in ("profession", "birth_year"):
                prompt, answer = table[kind]
                probes.append(
                    {
                        "prompt": prompt.format(**slots),
                        "answer": answer.format(**slots),
                        "lang": lang,
                        "kind": kind,
                        "subject": p.name[lang],
                        "sft_heldout": p.sft_heldout,
                    }
                )
        for const in world.constants:
            probes.append(
                {
                    "prompt": const.prompt[lang],
                    "answer": const.answer(lang),
                    "lang": lang,
                    "kind": "constant",
                    "subject": const.key,
                    "sft_heldout": False,
                }
            )
    return probes


def probe_text(probe: dict) -> str:
    """The probe's prompt followed by its answer, as it reads inside the canonical sentence."""
    return probe["prompt"] + SEP[probe["lang"]] + probe["answer"]
