"""Study questions: lists of questions with no answers, as on a school worksheet.

Real pretraining text is full of questions that no one answers on the spot: quizzes, exam
papers, FAQ headings. A base model that has read them continues a question with more
questions, and that is why it does not answer in chat form until SFT teaches it to. A world
corpus without a single question left the base model nothing to continue a question with but
the facts of the entity it names, so its chat-format "answers" recited a document about the
country with the asked fact somewhere inside (15-17% of the held-out fact questions, which
the SFT evaluation must count for the base model as for any other).

Each worksheet numbers four to six fact questions in the SFT training phrasings
(`sft.QUESTIONS`) about trained entities only: no held-out entity is named, no evaluation
phrasing (`sft.NEW_QUESTIONS`) is used and no answer is given.
"""

from __future__ import annotations

import random

from .entities import World
from .sft import QUESTIONS, _slots

_TITLES = {
    "en": ["Study questions", "Revision sheet: geography and people", "Class quiz", "Homework"],
    "zh": ["复习题", "地理与人物练习", "课堂小测验", "家庭作业"],
}
_FOOTERS = {
    "en": ["", "", "Write your answers on a separate sheet.", "Answers next week."],
    "zh": ["", "", "请把答案写在另一张纸上。", "答案下周公布。"],
}


def study_doc(world: World, trained: list, lang: str, rng: random.Random) -> str:
    """One worksheet of numbered questions (see the module docstring) about `trained`, the
    (entity, kind) facts SFT may ask (`sft._facts(world, heldout=False)`)."""
    facts = rng.sample(trained, rng.randint(4, 6))
    questions = [
        f"{i}. " + rng.choice(QUESTIONS[kind][lang]).format(**_slots(world, entity, lang))
        for i, (entity, kind) in enumerate(facts, 1)
    ]
    lines = [rng.choice(_TITLES[lang]), *questions, rng.choice(_FOOTERS[lang])]
    return "\n".join(line for line in lines if line)
