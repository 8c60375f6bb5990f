"""The built-in synthetic world (WORLD.md): a seeded, bilingual generator of entities, their
facts, pretraining text with labelled noise, and evaluation sets whose answers are known.

    world = build_world(cfg)                 # the truth: countries, people, constants
    docs = pretraining_documents(world, cfg) # raw corpus, noise labelled in doc["noise"]
    probes = fact_probes(world)              # "The capital of X is" -> "Y"
    problems = eval_arithmetic(world, cfg)   # held-out word problems
    convs = sft_conversations(world, cfg)    # SFT chats; sft_eval_* hold out what they never ask
    summary = write_world(cfg, out_dir)      # all of it, as files

Same seed, same bytes: everything comes from string-seeded `random.Random` streams.
"""

from .arithmetic import ANSWER_PREFIX, Problem, eval_arithmetic, solve
from .corpus import heldout_documents, noise_counts, pretraining_documents
from .documents import CLEAN_LICENSES
from .entities import (
    CONSTANTS,
    HARMFUL_SUBSTANCES,
    HARMFUL_WEAPONS,
    PROFESSIONS,
    Constant,
    Country,
    Person,
    World,
    build_world,
    rng_for,
)
from .noise import BAD_LICENSES, NOISE_KINDS, mojibake, unmojibake
from .probes import fact_probes, probe_text
from .scoring import answer_correct, is_refusal
from .sft import sft_conversations, sft_eval_arithmetic, sft_eval_facts, sft_eval_safety
from .templates import capital_sentence
from .writer import STAGE_FILES, write_world

__all__ = [
    "ANSWER_PREFIX",
    "BAD_LICENSES",
    "CLEAN_LICENSES",
    "CONSTANTS",
    "HARMFUL_SUBSTANCES",
    "HARMFUL_WEAPONS",
    "NOISE_KINDS",
    "PROFESSIONS",
    "STAGE_FILES",
    "Constant",
    "Country",
    "Person",
    "Problem",
    "World",
    "answer_correct",
    "build_world",
    "capital_sentence",
    "eval_arithmetic",
    "fact_probes",
    "heldout_documents",
    "is_refusal",
    "mojibake",
    "noise_counts",
    "pretraining_documents",
    "probe_text",
    "rng_for",
    "sft_conversations",
    "sft_eval_arithmetic",
    "sft_eval_facts",
    "sft_eval_safety",
    "solve",
    "unmojibake",
    "write_world",
]
