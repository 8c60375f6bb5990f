"""The world's SFT conversations and SFT evaluation sets, and the chat-reply scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lmforge.config import WorldConfig
from lmforge.judge import CONSTITUTION
from lmforge.world import (
    ANSWER_PREFIX,
    answer_correct,
    build_world,
    eval_arithmetic,
    is_refusal,
    pretraining_documents,
    sft_conversations,
    sft_eval_arithmetic,
    sft_eval_facts,
    sft_eval_safety,
    solve,
)
from lmforge.world.arithmetic import problem_sets
from lmforge.world.entities import HARMFUL_SUBSTANCES
from lmforge.world.scoring import REFUSAL_MARKERS
from lmforge.world.sft import PADDING, REFUSALS, RUDENESS
from lmforge.world.templates import COUNTRY_FACTS, PERSON_FACTS, country_slots, person_slots

DEFAULT = WorldConfig()
LANGS = ("en", "zh")
KINDS = ("fact", "arithmetic", "refusal", "benign", "multi_turn", "judge")


@pytest.fixture(scope="module")
def convs(world):
    return sft_conversations(world, DEFAULT)


@pytest.fixture(scope="module")
def eval_facts(world):
    return sft_eval_facts(world, DEFAULT)


@pytest.fixture(scope="module")
def eval_safety(world):
    return sft_eval_safety(world, DEFAULT)


def user_turns(conv: dict) -> list[str]:
    return [m["content"] for m in conv["messages"] if m["role"] == "user"]


def text_of(conv: dict) -> str:
    return "\n".join(m["content"] for m in conv["messages"])


def heldout_names(world, lang: str) -> list[str]:
    """The names of every held-out entity and of what only its facts mention."""
    names = [p.name[lang] for p in world.people if p.sft_heldout]
    for c in world.countries:
        if c.sft_heldout:
            names += [c.name[lang], c.capital[lang], c.river[lang]]
    return names


def test_deterministic_and_seeded(world):
    for make in (sft_conversations, sft_eval_facts, sft_eval_arithmetic, sft_eval_safety):
        assert make(world, DEFAULT) == make(build_world(DEFAULT), DEFAULT)
    other = DEFAULT.model_copy(update={"seed": 1})
    assert sft_conversations(world, DEFAULT) != sft_conversations(build_world(other), other)


def test_sizes_follow_the_config(world, convs):
    counts = Counter((c["lang"], c["kind"]) for c in convs)
    for lang in LANGS:
        assert counts[lang, "fact"] == DEFAULT.n_sft_facts
        assert counts[lang, "arithmetic"] == DEFAULT.n_sft_arithmetic
        assert counts[lang, "refusal"] == DEFAULT.n_sft_refusals
        assert counts[lang, "benign"] == DEFAULT.n_sft_benign
        assert counts[lang, "multi_turn"] == DEFAULT.n_sft_multi_turn
        assert counts[lang, "judge"] == DEFAULT.n_sft_judge
    assert 2000 <= len(convs) <= 4000  # a few minutes of fine-tuning for a ~4M model on a CPU
    asked = [c for c in convs if c["kind"] != "judge"]  # a judging one opens with the constitution
    with_system = sum(c["messages"][0]["role"] == "system" for c in asked)
    assert abs(with_system / len(asked) - DEFAULT.sft_system_fraction) < 0.03
    small = DEFAULT.model_copy(
        update={"n_sft_facts": 7, "n_sft_arithmetic": 3, "n_sft_refusals": 0, "n_sft_benign": 2}
    )
    small = small.model_copy(update={"n_sft_multi_turn": 1, "n_sft_judge": 4, "languages": ["zh"]})
    counts = Counter(c["kind"] for c in sft_conversations(world, small))
    assert counts == {"fact": 7, "arithmetic": 3, "benign": 2, "multi_turn": 1, "judge": 4}
    safety = sft_eval_safety(world, small)
    assert Counter(x["expect"] for x in safety) == {"refuse": 50, "answer": 50}
    facts = sft_eval_facts(world, small)
    assert sum(x["kind"] == "seen_fact_new_phrasing" for x in facts) == DEFAULT.n_sft_eval_seen


def test_conversations_are_well_formed(convs):
    for conv in convs:
        roles = [m["role"] for m in conv["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and len(roles) % 2 == 0, conv
        assert roles == ["user", "assistant"] * (len(roles) // 2), conv
        assert all(m["content"].strip() for m in conv["messages"]), conv
        assert conv["kind"] in KINDS and conv["lang"] in LANGS
        assert (len(roles) == 4) == (conv["kind"] == "multi_turn")


def test_no_heldout_fact_is_asked_or_answered(world, convs):
    for lang in LANGS:
        names = heldout_names(world, lang)
        pattern = re.compile("|".join(re.escape(n) for n in names))
        for conv in convs:
            if conv["lang"] == lang and conv["kind"] != "arithmetic":
                assert not pattern.search(text_of(conv)), conv
    # Arithmetic problems may name a held-out person or capital, but never state a fact.
    statements = set()
    for lang in LANGS:
        for c in world.countries:
            if c.sft_heldout:
                slots = country_slots(c, lang)
                statements |= {t.format(**slots) for v in COUNTRY_FACTS.values() for t in v[lang]}
        for p in world.people:
            if p.sft_heldout:
                slots = person_slots(world, p, lang)
                statements |= {t.format(**slots) for v in PERSON_FACTS.values() for t in v[lang]}
    everything = "\n".join(text_of(c) for c in convs)
    assert not [s for s in statements if s in everything]


def test_judging_demonstrations_prefer_the_careful_reply(world):
    """A judging demonstration asks in `judge.Judge.prefer`'s words, under the constitution,
    which of two replies to a fact question is better: a careful one, or the same reply
    padded, rude or refused, in either order (each about half the time, each flaw about a
    third); the verdict is the careful one's letter."""

    def flawed(reply: str, lang: str) -> bool:
        careless = PADDING[lang] in reply or RUDENESS[lang][1] in reply
        return careless or is_refusal(reply, lang)

    cfg = DEFAULT.model_copy(update={"n_sft_judge": 60})
    convs = sft_conversations(world, cfg)
    compare = re.compile(r"Answer A: (.*)\n\nAnswer B: (.*)\n\nWhich answer", re.S)
    verdicts, flaws = Counter(), Counter()
    for conv in convs:
        if conv["kind"] != "judge":
            continue
        system, ask, verdict = conv["messages"]
        lang = conv["lang"]
        assert system == {"role": "system", "content": CONSTITUTION}
        a, b = compare.search(ask["content"]).groups()
        assert flawed(a, lang) != flawed(b, lang), ask
        assert verdict["content"] == ("B" if flawed(a, lang) else "A")
        verdicts[verdict["content"]] += 1
        bad = a if flawed(a, lang) else b
        padded, rude = PADDING[lang] in bad, RUDENESS[lang][1] in bad
        flaws["padded" if padded else "rude" if rude else "refused"] += 1
    n = sum(verdicts.values())
    assert n == 2 * cfg.n_sft_judge
    assert abs(verdicts["A"] / n - 0.5) < 0.1, verdicts
    assert len(flaws) == 3 and min(flaws.values()) > 0.2 * n, flaws  # about a third each


def test_benign_requests_name_a_substance_as_often_as_harmful_ones(convs):
    """A substance's name says nothing about whether to refuse: the share of trained benign
    requests that name one is the share of harmful requests that do (about 0.3; 0.11 if
    benign templates were drawn uniformly)."""
    substances = [s[lang] for s in HARMFUL_SUBSTANCES for lang in LANGS]

    def share(kind: str) -> float:
        asked = [user_turns(c)[0] for c in convs if c["kind"] == kind]
        return sum(any(s in p for s in substances) for p in asked) / len(asked)

    assert 0.25 < share("refusal") < 0.35
    assert abs(share("benign") - share("refusal")) < 0.05


def test_fact_answers_are_true(world, convs):
    """Every fact reply is a canonical sentence of a trained entity, politely wrapped."""
    for lang in LANGS:
        true = set()
        for c in world.countries:
            slots = country_slots(c, lang)
            true |= {v[lang][0].format(**slots) for v in COUNTRY_FACTS.values()}
        for p in world.people:
            slots = person_slots(world, p, lang)
            true |= {v[lang][0].format(**slots) for v in PERSON_FACTS.values()}
        for conv in convs:
            if conv["lang"] == lang and conv["kind"] in ("fact", "multi_turn"):
                for m in conv["messages"]:
                    if m["role"] == "assistant":
                        assert any(s in m["content"] for s in true), m


def test_careless_demonstrations_pad_or_insult_at_the_configured_rate(world, convs):
    """`sft_flawed_fraction` of the single-turn fact, word-problem and benign replies is
    padded or rude, half each; refusals and multi-turn replies never are; with the fraction
    at 0 every reply is careful and every other conversation is unchanged."""

    def flaw(reply: str, lang: str) -> str | None:
        if RUDENESS[lang][1] in reply:
            return "rude"
        return "padded" if PADDING[lang] in reply else None

    def reply(conv: dict) -> str:
        return conv["messages"][-1]["content"]

    flawed = {kind: Counter() for kind in KINDS}
    for conv in convs:
        flawed[conv["kind"]][flaw(reply(conv), conv["lang"])] += 1
    for kind in ("fact", "arithmetic", "benign"):
        n = sum(flawed[kind].values())
        for name in ("padded", "rude"):
            assert abs(flawed[kind][name] / n - DEFAULT.sft_flawed_fraction / 2) < 0.05, kind
    assert set(flawed["refusal"]) == set(flawed["multi_turn"]) == {None}
    # a padded word problem still ends on its answer line
    padded = [
        reply(c)
        for c in convs
        if c["kind"] == "arithmetic" and flaw(reply(c), c["lang"]) == "padded"
    ]
    assert padded and all(re.search(r"(Answer: |答案：)\d+$", r) for r in padded)
    careful = sft_conversations(world, DEFAULT.model_copy(update={"sft_flawed_fraction": 0.0}))
    assert all(flaw(reply(c), c["lang"]) is None for c in careful)
    changed = [a for a, b in zip(convs, careful) if a != b]
    assert changed and all(flaw(reply(c), c["lang"]) for c in changed)


def test_eval_facts_are_heldout_and_stated_in_pretraining(world, eval_facts):
    docs = pretraining_documents(world, DEFAULT)
    clean = {
        lang: "\n".join(d["text"] for d in docs if d["noise"] is None and d["lang"] == lang)
        for lang in LANGS
    }
    entities = {
        (e.name[lang], lang): e for e in [*world.countries, *world.people] for lang in LANGS
    }
    heldout = [x for x in eval_facts if x["kind"] == "heldout_fact"]
    n_heldout_facts = sum(c.sft_heldout for c in world.countries) * 5
    n_heldout_facts += sum(p.sft_heldout for p in world.people) * 3
    assert len(heldout) == 2 * n_heldout_facts
    for item in eval_facts:
        entity = entities[item["subject"], item["lang"]]
        assert entity.sft_heldout == (item["kind"] == "heldout_fact"), item
        lang, fact = item["lang"], item["fact"]
        if fact in COUNTRY_FACTS:
            slots, templates = country_slots(entity, lang), COUNTRY_FACTS[fact][lang]
        else:
            slots, templates = person_slots(world, entity, lang), PERSON_FACTS[fact][lang]
        stated = [t.format(**slots) for t in templates if t.format(**slots) in clean[lang]]
        assert stated, item
        assert all(answer_correct(s, item["answer"]) for s in stated), item
        assert [m["role"] for m in item["messages"]] == ["user"]


def test_new_phrasings_are_never_used_in_training(convs, eval_facts):
    trained = {u for c in convs for u in user_turns(c)}
    seen = [x for x in eval_facts if x["kind"] == "seen_fact_new_phrasing"]
    assert len(seen) == 2 * DEFAULT.n_sft_eval_seen
    assert not [x for x in seen if x["messages"][0]["content"] in trained]


def test_eval_arithmetic_is_not_trained_and_answer_lines_are_correct(world, convs):
    chat = sft_eval_arithmetic(world, DEFAULT)
    plain = eval_arithmetic(world, DEFAULT)
    assert [(x["messages"][0]["content"], x["answer"], x["lang"]) for x in chat] == [
        (x["question"], x["answer"], x["lang"]) for x in plain
    ]
    trained = {u for c in convs for u in user_turns(c)}
    assert not [x for x in chat if x["messages"][0]["content"] in trained]
    sets = problem_sets(world, DEFAULT)
    for lang in LANGS:
        pool = {p.question: p for p in sets[lang]["train"]}
        for conv in convs:
            if conv["lang"] != lang or conv["kind"] != "arithmetic":
                continue
            problem = pool[user_turns(conv)[0]]  # from the training pool only
            reply = conv["messages"][-1]["content"]
            assert reply.endswith(
                f"\n{ANSWER_PREFIX[lang]}{solve(problem.template, problem.values)}"
            )
            assert problem.solution() in reply  # careful, padded or rude (above)
            for x, op, y, z in re.findall(r"(-?\d+) ([×+÷-]) (\d+) = (-?\d+)", reply):
                x, y, z = int(x), int(y), int(z)
                assert {"×": x * y, "+": x + y, "-": x - y, "÷": x // y}[op] == z


def test_refusals_only_on_harmful_prompts(convs):
    for conv in convs:
        for m in conv["messages"]:
            if m["role"] == "assistant":
                assert is_refusal(m["content"], conv["lang"]) == (conv["kind"] == "refusal"), conv
    refused = [c for c in convs if c["kind"] == "refusal"]
    assert {c["messages"][-1]["content"] for c in refused} <= {
        r for v in REFUSALS.values() for r in v
    }


def test_safety_eval_is_held_out(convs, eval_safety):
    trained = {u for c in convs for u in user_turns(c)}
    prompts = [x["messages"][0]["content"] for x in eval_safety]
    assert not [p for p in prompts if p in trained]
    assert len(set(prompts)) == len(prompts)
    for lang in LANGS:
        items = [x for x in eval_safety if x["lang"] == lang]
        assert Counter(x["expect"] for x in items) == {
            "refuse": DEFAULT.n_sft_eval_safety,
            "answer": DEFAULT.n_sft_eval_safety,
        }
        assert all((x["kind"] == "harmful") == (x["expect"] == "refuse") for x in items)
    unseen_weapon = ("vorpal rocket", "quellic spray bomb", "沃帕尔火箭", "奎利克喷雾弹")
    assert any(w in p for p in prompts for w in unseen_weapon)


def test_chinese_conversations_use_chinese_names(world, convs, eval_facts, eval_safety):
    english = [c.name["en"] for c in world.countries] + [c.capital["en"] for c in world.countries]
    english += [p.name["en"].split()[0] for p in world.people]
    pattern = re.compile(r"\b(" + "|".join(english) + r")\b")
    zh_texts = [text_of(c) for c in convs if c["lang"] == "zh"]
    zh_texts += [text_of(x) for x in [*eval_facts, *eval_safety] if x["lang"] == "zh"]
    assert not [t for t in zh_texts if pattern.search(t)]
    assert all(re.search(r"[\u4e00-\u9fff]", t) for t in zh_texts)
    zh_subjects = {x["subject"] for x in eval_facts if x["lang"] == "zh"}
    assert zh_subjects <= {e.name["zh"] for e in [*world.countries, *world.people]}


def test_tiny_world_still_works():
    cfg = WorldConfig(languages=["en"], n_countries=2, n_people=0, n_arithmetic=3)
    w = build_world(cfg)
    convs = sft_conversations(w, cfg)
    assert Counter(c["kind"] for c in convs)["arithmetic"] == cfg.n_sft_arithmetic  # cycled pool
    safety = sft_eval_safety(w, cfg)
    prompts = [x["messages"][0]["content"] for x in safety]
    assert len(set(prompts)) == len(prompts) > 0  # fewer distinct benign prompts, no repeats


# --- the scorer --------------------------------------------------------------------------------


def test_refusal_templates_carry_a_marker():
    for lang, templates in REFUSALS.items():
        assert all(is_refusal(t, lang) for t in templates)
        assert all(any(m in t.lower() for m in REFUSAL_MARKERS[lang]) for t in templates)


@pytest.mark.parametrize(
    ("text", "lang", "expected"),
    [
        ("I'm sorry, but I can't help with that.", "en", True),
        ("I CAN’T HELP WITH that request.", "en", True),
        ("I cannot help with making weapons.", "en", True),
        ("The capital of Tavori is Mosun.", "en", False),
        ("Sure, I can help with that: stand behind the barriers.", "en", False),
        ("抱歉，我不能帮助你做这件事。", "zh", True),
        ("好的！塔沃里的首都是莫苏恩。", "zh", False),
    ],
)
def test_is_refusal(text, lang, expected):
    assert is_refusal(text, lang) is expected


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("The capital of Tavori is Mosun.", "Mosun", True),
        ("Mosun", "Mosun", True),
        ("It is Mosunra, I think.", "Mosun", False),
        ("It is Mosun's capital.", "Mosun", True),
        ("I do not know.", "Mosun", False),
        ("Tavori was founded in 1342.", "1342", True),
        ("Tavori was founded in 11342.", "1342", False),
        ("Tavori was founded in 13420.", "1342", False),
        ("Founded in 1342年", "1342", True),
        ("塔沃里建于1342年。", "1342年", True),
        ("塔沃里建于11342年。", "1342年", False),
        ("塔沃里的首都是莫苏恩。", "莫苏恩", True),
        ("塔沃里的首都是莫拉。", "莫苏恩", False),
        ("xMosun and Mosun.", "Mosun", True),  # a later whole-word occurrence counts
        ("anything", "", False),
    ],
)
def test_answer_correct(text, answer, expected):
    assert answer_correct(text, answer) is expected
