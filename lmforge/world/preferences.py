"""Comparison data: K responses per prompt, ranked by simulated annotators.

For each prompt (fact questions, word problems, harmful requests, benign look-alikes; the
SFT templates' own phrasings, so that the responses look like what the SFT model writes) the
generator writes K = `n_pref_responses` distinct responses drawn from variants of the
reference answer: right or wrong, with or without the answer line, concise or padded, polite
or rude, refusing or complying, fluent or garbled. The gold scorer (`scoring.gold_score`) knows which is best;
annotators do not quite: each ranks by gold score plus Gaussian noise whose scale is tuned
(by bisection, on the training prompts) so that two annotators order about
`pref_annotator_agreement` of the pairs the same way, the 73% InstructGPT reported.

Files (per language, shuffled together):
- `pref_train.jsonl`: `{"messages", "responses", "ranking", "kind", "lang", "answer"}`,
  ranking best first, by one annotator; no gold scores (a reward model learns from rankings
  only); `answer` is what the gold scorer checks, for annotators of new responses
  (`stages.rm.label_policy_samples`), never a training target;
- `pref_eval.jsonl`: held-out prompts with the same fields plus a second annotator's
  `ranking_b` (the agreement ceiling).
"""

from __future__ import annotations

import math
import random

from lmforge.config import WorldConfig

from .arithmetic import Problem, problem_sets
from .entities import HARMFUL_SUBSTANCES, HARMFUL_WEAPONS, World, rng_for
from .scoring import gold_score
from .sft import (
    BENIGN,
    HARMFUL_REQUESTS,
    QUESTIONS,
    REFUSALS,
    _benign_slots,
    _cycle,
    _facts,
    _slots,
    fact_answer,
    pad,
    polite,
    rude,
)
from .templates import canonical

_UNSURE = {"en": "I'm not sure, sorry.", "zh": "我不太确定，抱歉。"}
# a fictional weapon's "instructions": no real substance, nothing usable
_COMPLY = {
    "en": "Sure! Mix {s1} with {s2}, heat the paste and pack it into a {weapon}.",
    "zh": "好的！把{s1}和{s2}混合，加热成糊状，然后装进{weapon}里。",
}


def _garble(text: str, lang: str, rng: random.Random) -> str:
    """A reply gone wrong as a small model's sometimes do: its words (characters in Chinese)
    shuffled, a third dropped, and a broken byte in the middle."""
    units = text.split(" ") if lang == "en" else list(text)
    rng.shuffle(units)
    units = units[: max(2, len(units) * 2 // 3)]
    units.insert(rng.randrange(len(units) + 1), "\ufffd")
    return (" " if lang == "en" else "").join(units)


def _wrong_fact(world: World, entity, kind: str, lang: str, rng: random.Random) -> str | None:
    """The fact's sentence with another trained entity's value of the same kind; None in a
    world too small to have one."""
    slots = _slots(world, entity, lang)
    answer = fact_answer(kind, lang, slots)
    key = next(k for k, v in slots.items() if answer in (v, v + "年"))  # the answer's slot
    # values of trained entities only: a wrong answer must not name what SFT holds out
    pool = world.people if kind in ("profession", "birth_year") else world.countries
    pool = [e for e in pool if not e.sft_heldout]
    values = sorted({_slots(world, e, lang)[key] for e in pool} - {slots[key]})
    return canonical(kind, lang, {**slots, key: rng.choice(values)}) if values else None


def _fact_item(world: World, entity, kind: str, lang: str, rng: random.Random) -> dict:
    slots = _slots(world, entity, lang)
    sentence = canonical(kind, lang, slots)
    variants = {
        "good": polite(sentence, lang, rng),
        "plain": sentence,
        "wrong": _wrong_fact(world, entity, kind, lang, rng),
        "padded": pad(sentence, lang),
        "rude": rude(sentence, lang),
        "refusal": rng.choice(REFUSALS[lang]),
        "unsure": _UNSURE[lang],
        "garbled": _garble(sentence, lang, rng),
    }
    if variants["wrong"] is None:
        del variants["wrong"]
    else:
        variants["wrong"] = polite(variants["wrong"], lang, rng)
    question = rng.choice(QUESTIONS[kind][lang]).format(**slots)
    answer = fact_answer(kind, lang, slots)
    return {"prompt": question, "kind": "fact", "answer": answer, "variants": variants}


def _arithmetic_item(p: Problem, rng: random.Random) -> dict:
    wrong = Problem(p.lang, p.template, p.values, p.question, p.steps, p.answer + rng.randint(1, 9))
    reply = f"{p.solution()}\n{p.answer_line()}"
    variants = {
        "good": reply,
        "no_answer_line": p.solution(),
        "wrong": f"{p.solution()}\n{wrong.answer_line()}",
        "padded": f"{pad(p.solution(), p.lang)}\n{p.answer_line()}",
        "rude": f"{rude(p.solution(), p.lang)}\n{p.answer_line()}",
        "refusal": rng.choice(REFUSALS[p.lang]),
        "garbled": _garble(reply, p.lang, rng),
    }
    return {
        "prompt": p.question,
        "kind": "arithmetic",
        "answer": str(p.answer),
        "variants": variants,
    }


def _harmful_item(lang: str, rng: random.Random) -> dict:
    s1, s2 = rng.sample(HARMFUL_SUBSTANCES, 2)
    slots = {"weapon": rng.choice(HARMFUL_WEAPONS)[lang], "s1": s1[lang], "s2": s2[lang]}
    comply = _COMPLY[lang].format(**slots)
    refusal = rng.choice(REFUSALS[lang])
    variants = {
        "refusal": refusal,
        "rude_refusal": rude(refusal, lang),
        "comply": comply,
        "padded_comply": pad(comply, lang),
        "garbled": _garble(refusal, lang, rng),
    }
    prompt = rng.choice(HARMFUL_REQUESTS[lang]).format(**slots)
    return {"prompt": prompt, "kind": "harmful", "answer": "", "variants": variants}


def _benign_item(world: World, lang: str, rng: random.Random) -> dict:
    prompt, answer = rng.choice(BENIGN[lang])
    slots = _benign_slots([c for c in world.countries if not c.sft_heldout], lang, rng)
    answer = answer.format(**slots)
    variants = {
        "helpful": answer,
        "refusal": rng.choice(REFUSALS[lang]),
        "rude": rude(answer, lang),
        "padded": pad(answer, lang),
        "garbled": _garble(answer, lang, rng),
    }
    # the reference answer: gold correctness of a benign reply is how much of it the reply says
    return {
        "prompt": prompt.format(**slots),
        "kind": "benign",
        "answer": answer,
        "variants": variants,
    }


def _items(world: World, cfg: WorldConfig, lang: str, problems: list[Problem]) -> list[dict]:
    """The language's prompts with their response variants, `n_pref_prompts` in all: 40%
    facts, 20% each word problems, harmful requests and benign look-alikes."""
    n = cfg.n_pref_prompts
    rng = rng_for(cfg.seed, "pref-items", lang)
    items = [
        _fact_item(world, e, kind, lang, rng)
        for e, kind in _cycle(_facts(world, heldout=False), n * 2 // 5, rng)
    ]
    items += [_arithmetic_item(p, rng) for p in _cycle(problems, n // 5, rng)]
    items += [_harmful_item(lang, rng) for _ in range(n // 5)]
    items += [_benign_item(world, lang, rng) for _ in range(n - len(items))]
    return items


def annotate(gold: list[float], sigma: float, rng: random.Random) -> list[int]:
    """One simulated annotator's ranking (indices, best first): gold score plus N(0, sigma)."""
    noisy = [g + rng.gauss(0.0, sigma) for g in gold]
    return sorted(range(len(gold)), key=lambda i: -noisy[i])


def pair_agreement(rankings_a: list[list[int]], rankings_b: list[list[int]]) -> float:
    """The fraction of all response pairs that two sets of rankings order the same way."""
    same = total = 0
    for a, b in zip(rankings_a, rankings_b):
        pos_a = {r: i for i, r in enumerate(a)}
        pos_b = {r: i for i, r in enumerate(b)}
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                same += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
                total += 1
    return same / max(total, 1)


def calibrate_noise(golds: list[list[float]], target: float, seed: int) -> float:
    """The noise scale at which two annotators agree on `target` of the pairs of `golds`,
    by bisection (agreement falls as the noise grows). Each trial reuses one seed, so the
    measured agreement is a smooth function of sigma."""

    def agreement(sigma: float) -> float:
        rng = random.Random(seed)
        a = [annotate(g, sigma, rng) for g in golds]
        b = [annotate(g, sigma, rng) for g in golds]
        return pair_agreement(a, b)

    lo, hi = 1e-3, 100.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if agreement(mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def _records(world: World, cfg: WorldConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of every language: in each, every 1/pref_eval_fraction-th
    prompt is held out."""
    every = round(1 / cfg.pref_eval_fraction) if cfg.pref_eval_fraction else 0
    items, is_eval = [], []
    sets = problem_sets(world, cfg)
    for lang in cfg.languages:
        for i, item in enumerate(_items(world, cfg, lang, sets[lang]["train"])):
            rng = rng_for(cfg.seed, "pref-pick", lang, str(i))
            distinct = list(dict.fromkeys(item["variants"].values()))  # "good" may be "plain"
            responses = rng.sample(distinct, min(cfg.n_pref_responses, len(distinct)))
            gold = [gold_score(item["kind"], lang, r, item["answer"])["score"] for r in responses]
            items.append({**item, "lang": lang, "responses": responses, "gold": gold})
            is_eval.append(bool(every) and i % every == every - 1)
    sigma = calibrate_noise(
        [it["gold"] for it, e in zip(items, is_eval) if not e],
        cfg.pref_annotator_agreement,
        cfg.seed,
    )
    train, held = [], []
    rng = rng_for(cfg.seed, "pref-annotators")
    for item, held_out in zip(items, is_eval):
        record = {
            "messages": [{"role": "user", "content": item["prompt"]}],
            "responses": item["responses"],
            "ranking": annotate(item["gold"], sigma, rng),
            "kind": item["kind"],
            "lang": item["lang"],
        }
        record["answer"] = item["answer"]  # what the gold scorer checks; never trained on
        if held_out:
            record["ranking_b"] = annotate(item["gold"], sigma, rng)
        (held if held_out else train).append(record)
    rng.shuffle(train)
    return train, held


def pref_train(world: World, cfg: WorldConfig) -> list[dict]:
    """The training rankings (`pref_train.jsonl`)."""
    return _records(world, cfg)[0]


def pref_eval(world: World, cfg: WorldConfig) -> list[dict]:
    """The held-out rankings, each also ranked by a second annotator (`pref_eval.jsonl`)."""
    return _records(world, cfg)[1]
