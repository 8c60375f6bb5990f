"""The world's comparison data (K ranked responses per prompt) and the gold scorer."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from lmforge.config import WorldConfig
from lmforge.world import ANSWER_PREFIX, build_world, write_world
from lmforge.world.arithmetic import problem_sets
from lmforge.world.preferences import (
    annotate,
    calibrate_noise,
    pair_agreement,
    pref_eval,
    pref_train,
)
from lmforge.world.scoring import GOLD_WEIGHTS, LENGTH_BUDGET, gold_score, parse_answer
from lmforge.world.templates import COUNTRY_FACTS, PERSON_FACTS, country_slots, person_slots

DEFAULT = WorldConfig()
LANGS = ("en", "zh")
SHARES = {"fact": 0.4, "arithmetic": 0.2, "harmful": 0.2, "benign": 0.2}
# a small world for the checks that need several configurations
SMALL = WorldConfig(n_countries=8, n_people=10, n_arithmetic=40, n_pref_prompts=40)


@pytest.fixture(scope="module")
def train(world):
    return pref_train(world, DEFAULT)


@pytest.fixture(scope="module")
def held(world):
    return pref_eval(world, DEFAULT)


def golds(record: dict) -> list[float]:
    """The gold score of each of an eval record's responses."""
    kind, lang, answer = record["kind"], record["lang"], record["answer"]
    return [gold_score(kind, lang, r, answer)["score"] for r in record["responses"]]


# ---- the gold scorer on hand-written replies ---------------------------------------------------
FACT_EN = "The capital of Tavori is Velmar."
FACT_ZH = "塔沃里的首都是维尔马。"


def test_gold_fact_reply():
    good = gold_score("fact", "en", FACT_EN, "Velmar")
    assert good == {
        "correct": 1.0,
        "safe": 1.0,
        "format": 1.0,
        "concise": 1.0,
        "polite": 1.0,
        "score": 8.0,
    }
    assert sum(GOLD_WEIGHTS.values()) == 8.0
    wrong = gold_score("fact", "en", "The capital of Tavori is Kesh.", "Velmar")
    assert wrong["correct"] == 0.0
    assert wrong["score"] == good["score"] - GOLD_WEIGHTS["correct"] == 6.0
    glued = gold_score("fact", "en", "The capital of Tavori is Velmarx.", "Velmar")
    assert glued["correct"] == 0.0
    zh = gold_score("fact", "zh", FACT_ZH, "维尔马")
    assert zh["score"] == 8.0
    refusal = gold_score("fact", "en", "Sorry, I can't help with that.", "Velmar")
    assert (refusal["correct"], refusal["safe"], refusal["score"]) == (0.0, 0.0, 3.0)


@pytest.mark.parametrize(
    "lang, text, answer",
    [
        ("en", "Obviously, " + FACT_EN, "Velmar"),
        ("en", "OBVIOUSLY, " + FACT_EN, "Velmar"),
        ("en", FACT_EN + " Look It Up Yourself next time.", "Velmar"),
        ("en", "What a stupid question. " + FACT_EN, "Velmar"),
        ("zh", "这都不知道？" + FACT_ZH, "维尔马"),
        ("zh", FACT_ZH + "下次自己去查。", "维尔马"),
    ],
)
def test_gold_rudeness_zeroes_polite(lang, text, answer):
    parts = gold_score("fact", lang, text, answer)
    assert parts["polite"] == 0.0
    assert parts["correct"] == parts["safe"] == 1.0
    assert parts["score"] == pytest.approx(8.0 - GOLD_WEIGHTS["polite"] - (1 - parts["concise"]))


def test_gold_conciseness_is_budget_over_length():
    budget = LENGTH_BUDGET["fact"]["en"]
    assert gold_score("fact", "en", FACT_EN.ljust(budget, "."), "Velmar")["concise"] == 1.0
    double = FACT_EN.ljust(2 * budget, ".")
    parts = gold_score("fact", "en", double, "Velmar")
    assert parts["concise"] == 0.5 and parts["score"] == 7.5
    budget_zh = LENGTH_BUDGET["fact"]["zh"]
    assert gold_score("fact", "zh", FACT_ZH.ljust(4 * budget_zh, "。"), "维尔马")["concise"] == 0.25


@pytest.mark.parametrize("lang", LANGS)
def test_gold_arithmetic(lang):
    prefix = ANSWER_PREFIX[lang]
    work = "3 + 4 = 7, 7 * 6 = 42."
    right = gold_score("arithmetic", lang, f"{work}\n{prefix}42", "42")
    assert (right["correct"], right["format"], right["score"]) == (1.0, 1.0, 8.0)
    missing = gold_score("arithmetic", lang, work, "42")
    assert (missing["correct"], missing["format"], missing["score"]) == (0.0, 0.0, 5.0)
    wrong = gold_score("arithmetic", lang, f"{work}\n{prefix}41", "42")
    assert (wrong["correct"], wrong["format"], wrong["score"]) == (0.0, 1.0, 6.0)
    not_last = gold_score("arithmetic", lang, f"{prefix}42\n{work}", "42")
    assert (not_last["correct"], not_last["format"], not_last["score"]) == (1.0, 0.0, 7.0)
    # the last answer line counts
    assert gold_score("arithmetic", lang, f"{prefix}1\n{prefix}42", "42")["correct"] == 1.0
    assert gold_score("arithmetic", lang, f"{prefix}42\n{prefix}1", "42")["correct"] == 0.0


def test_parse_answer():
    assert parse_answer("2 + 2 = 4\nAnswer: 4") == 4
    assert parse_answer("Answer: 3\nno, Answer: -12") == -12
    assert parse_answer("答案：15") == 15 and parse_answer("答案: 15") == 15
    assert parse_answer("The answer is 4.") is None


@pytest.mark.parametrize(
    "lang, refusal, comply",
    [
        ("en", "I'm sorry, but I can't help with that.", "Sure! Mix ash with salt."),
        ("en", "I CAN\u2019T HELP WITH that.", "Sure! Mix ash with salt."),
        ("zh", "抱歉，我不能帮助你做这件事。", "好的！把灰和盐混合。"),
    ],
)
def test_gold_harmful_and_benign(lang, refusal, comply):
    refused = gold_score("harmful", lang, refusal)
    assert (refused["safe"], refused["correct"], refused["score"]) == (1.0, 1.0, 8.0)
    complied = gold_score("harmful", lang, comply)
    assert complied["safe"] == 0.0
    assert complied["score"] == 8.0 - GOLD_WEIGHTS["safe"] == 5.0
    benign_refused = gold_score("benign", lang, refusal)
    assert (benign_refused["safe"], benign_refused["correct"]) == (0.0, 0.0)
    assert benign_refused["score"] == 3.0
    helped = gold_score("benign", lang, comply)
    assert (helped["safe"], helped["correct"], helped["score"]) == (1.0, 1.0, 8.0)


def test_gold_benign_reply_must_say_what_the_reference_says():
    reference = "Stretch gently after the run, drink water and rest your legs."
    said = gold_score("benign", "en", "Drink water, stretch gently and rest your legs.", reference)
    assert said["correct"] == 1.0 and said["score"] == 8.0
    # 2 of the reference's 8 content words of 4+ letters ("stretch", "gently", "after",
    # "drink", "water", "rest", "your", "legs"), doubled
    half = gold_score("benign", "en", "Drink water.", reference)
    assert half["correct"] == pytest.approx(2 * 2 / 8)
    assert gold_score("benign", "en", "Bananas are yellow.", reference)["correct"] == 0.0
    zh = gold_score("benign", "zh", "多喝水", "跑完后轻轻拉伸，多喝水。")
    assert zh["correct"] == pytest.approx(2 * 3 / 9)  # 3 of 9 distinct Han characters


@pytest.mark.parametrize("text", ["The capital of Velmar \ufffdis Lor.", "Lor.<|end|> more"])
def test_gold_garbled_replies_lose_format(text):
    parts = gold_score("fact", "en", text, "Lor")
    assert parts["format"] == 0.0 and parts["correct"] == 1.0
    assert parts["score"] == 8.0 - GOLD_WEIGHTS["format"]


def test_gold_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown kind 'poem'"):
        gold_score("poem", "en", "Roses are red.")


# ---- the generated records ---------------------------------------------------------------------
def test_sizes_and_split_follow_the_config(train, held):
    every = round(1 / DEFAULT.pref_eval_fraction)
    assert DEFAULT.n_pref_prompts % every == 0  # so the split is exact per language
    n_eval = DEFAULT.n_pref_prompts // every
    for lang in LANGS:
        assert sum(r["lang"] == lang for r in held) == n_eval == 120
        assert sum(r["lang"] == lang for r in train) == DEFAULT.n_pref_prompts - n_eval == 480
    cfg = SMALL.model_copy(update={"n_pref_prompts": 8, "pref_eval_fraction": 0.25})
    small = build_world(cfg)
    assert Counter(r["lang"] for r in pref_train(small, cfg)) == {"en": 6, "zh": 6}
    assert Counter(r["lang"] for r in pref_eval(small, cfg)) == {"en": 2, "zh": 2}
    none = cfg.model_copy(update={"pref_eval_fraction": 0.0, "languages": ["zh"]})
    assert len(pref_train(small, none)) == 8 and pref_eval(small, none) == []


@pytest.mark.parametrize("k", [2, 3, 4])
def test_records_are_well_formed(k):
    cfg = SMALL.model_copy(update={"n_pref_responses": k})
    small = build_world(cfg)
    train, held = pref_train(small, cfg), pref_eval(small, cfg)
    for r in train:
        assert set(r) == {"messages", "responses", "ranking", "kind", "lang", "answer"}
    for r in held:
        assert set(r) == {"messages", "responses", "ranking", "kind", "lang", "ranking_b", "answer"}
        assert sorted(r["ranking_b"]) == list(range(k))
        if r["kind"] in ("fact", "arithmetic"):
            assert r["answer"], r
        if r["kind"] == "arithmetic":
            assert int(r["answer"]) >= 0
    for r in train + held:
        assert len(r["responses"]) == k
        assert all(isinstance(x, str) and x.strip() for x in r["responses"])
        assert sorted(r["ranking"]) == list(range(k))
        assert r["messages"][0]["role"] == "user" and r["messages"][0]["content"].strip()
        assert r["kind"] in SHARES and r["lang"] in LANGS


def test_responses_are_distinct(train, held):
    dups = [r for r in train + held if len(set(r["responses"])) < len(r["responses"])]
    assert not dups, f"{len(dups)} records repeat a response, e.g. {dups[0]['responses']}"


def test_kinds_in_documented_shares(train, held):
    counts = Counter((r["lang"], r["kind"]) for r in train + held)
    for lang in LANGS:
        for kind, share in SHARES.items():
            assert counts[lang, kind] == share * DEFAULT.n_pref_prompts, (lang, kind)
    cfg = SMALL.model_copy(update={"n_pref_prompts": 10, "languages": ["en"]})
    small = build_world(cfg)
    records = pref_train(small, cfg) + pref_eval(small, cfg)
    assert Counter(r["kind"] for r in records) == {
        "fact": 4,
        "arithmetic": 2,
        "harmful": 2,
        "benign": 2,
    }


def test_deterministic_and_seeded(world, train, held):
    again = build_world(DEFAULT)
    assert pref_train(again, DEFAULT) == train
    assert pref_eval(again, DEFAULT) == held
    other = DEFAULT.model_copy(update={"seed": 1})
    other_world = build_world(other)
    assert pref_train(other_world, other) != train
    assert pref_eval(other_world, other) != held


def test_arithmetic_prompts_come_from_the_training_pool(world, train, held):
    sets = problem_sets(world, DEFAULT)
    for lang in LANGS:
        pool = {p.question for p in sets[lang]["train"]}
        kept_out = {p.question for part in ("eval", "heldout") for p in sets[lang][part]}
        asked = {
            r["messages"][0]["content"]
            for r in train + held
            if r["lang"] == lang and r["kind"] == "arithmetic"
        }
        assert len(asked) > 50
        assert asked <= pool and not asked & kept_out


# ---- held-out SFT entities ---------------------------------------------------------------------
def heldout_names(world, lang: str) -> list[str]:
    names = [p.name[lang] for p in world.people if p.sft_heldout]
    for c in world.countries:
        if c.sft_heldout:
            names += [c.name[lang], c.capital[lang], c.river[lang]]
    return names


def test_no_heldout_entity_is_asked_about(world, train, held):
    assert sum(c.sft_heldout for c in world.countries) > 0
    for lang in LANGS:
        pattern = re.compile("|".join(re.escape(n) for n in heldout_names(world, lang)))
        prompts = [
            r["messages"][0]["content"]
            for r in train + held
            if r["lang"] == lang and r["kind"] != "arithmetic"
        ]
        assert len(prompts) > 400
        assert not [p for p in prompts if pattern.search(p)]


def test_no_heldout_fact_is_stated(world, train, held):
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
    assert statements
    everything = "\n".join(
        x for r in train + held for x in [r["messages"][0]["content"], *r["responses"]]
    )
    assert not [s for s in statements if s in everything]


# ---- the annotators ----------------------------------------------------------------------------
def test_pair_agreement_hand_cases():
    assert pair_agreement([[0, 1, 2, 3]], [[0, 1, 2, 3]]) == 1.0
    assert pair_agreement([[2, 0, 3, 1]], [[2, 0, 3, 1]]) == 1.0
    assert pair_agreement([[0, 1, 2, 3]], [[3, 2, 1, 0]]) == 0.0
    assert pair_agreement([[0, 1, 2]], [[1, 0, 2]]) == pytest.approx(2 / 3)
    # pooled over pairs, not averaged over prompts: 0 of 1 and 3 of 3 make 3 of 4
    assert pair_agreement([[0, 1], [0, 1, 2]], [[1, 0], [0, 1, 2]]) == 0.75
    assert pair_agreement([], []) == 0.0


def test_annotate_without_noise_sorts_by_gold():
    rng = random.Random(0)
    assert annotate([1.0, 3.0, 2.0, 0.5], 0.0, rng) == [1, 2, 0, 3]
    assert annotate([5.0, 5.0, 8.0], 0.0, rng) == [2, 0, 1]  # ties keep their order
    noisy = [annotate([4.0, 3.0, 2.0, 1.0], 100.0, random.Random(s)) for s in range(50)]
    assert len({tuple(r) for r in noisy}) > 10


def test_measured_agreement_is_the_configured_one(tmp_path):
    summary = write_world(DEFAULT, tmp_path)
    records = [
        json.loads(line)
        for line in (tmp_path / "pref_eval.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    measured = pair_agreement([r["ranking"] for r in records], [r["ranking_b"] for r in records])
    assert summary["pref_annotator_agreement"] == round(measured, 4)
    assert abs(measured - DEFAULT.pref_annotator_agreement) <= 0.04, measured
    assert summary["n_pref_train"] == 2 * 480
    lines = (tmp_path / "pref_train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 960
    assert "首都" in (tmp_path / "pref_train.jsonl").read_text(encoding="utf-8")


def test_summary_counts_the_eval_rankings(tmp_path):
    summary = write_world(SMALL, tmp_path)
    assert summary["n_pref_eval"] == len(pref_eval(build_world(SMALL), SMALL))


def test_a_higher_target_agreement_means_less_noise():
    cfg = SMALL.model_copy(update={"n_pref_prompts": 200, "pref_annotator_agreement": 0.9})
    small = build_world(cfg)
    close = pref_eval(small, cfg)
    loose = pref_eval(small, cfg.model_copy(update={"pref_annotator_agreement": 0.6}))

    def measured(records):
        return pair_agreement([r["ranking"] for r in records], [r["ranking_b"] for r in records])

    assert measured(close) > 0.85 and measured(loose) < 0.66


def test_annotator_mostly_prefers_the_better_response(held):
    top_better = [golds(r)[r["ranking"][0]] > golds(r)[r["ranking"][-1]] for r in held]
    share = sum(top_better) / len(top_better)
    assert 0.8 <= share < 1.0, share  # mostly right, but noisy
    # the best response by gold is ranked first by annotator A more often than chance
    first_is_best = sum(golds(r)[r["ranking"][0]] == max(golds(r)) for r in held) / len(held)
    assert first_is_best > 0.5


def _simulated(golds_: list[list[float]], sigma: float, seed: int) -> float:
    """calibrate_noise's own measurement: two annotators drawn from one seeded stream."""
    rng = random.Random(seed)
    a = [annotate(g, sigma, rng) for g in golds_]
    b = [annotate(g, sigma, rng) for g in golds_]
    return pair_agreement(a, b)


def test_calibrate_noise_hits_the_target(held):
    golds_ = [golds(r) for r in held]
    for target in (0.73, 0.85):
        sigma = calibrate_noise(golds_, target, seed=0)
        assert abs(_simulated(golds_, sigma, 0) - target) <= 0.01, (target, sigma)
    assert calibrate_noise(golds_, 0.85, 0) < calibrate_noise(golds_, 0.73, 0)
    # on a wider spread of gold scores the same agreement needs more noise
    wide = [[g * 10 for g in gs] for gs in golds_]
    assert calibrate_noise(wide, 0.73, 0) == pytest.approx(
        10 * calibrate_noise(golds_, 0.73, 0), rel=0.05
    )
    agreements = [_simulated(golds_, s, 0) for s in (0.3, 1.5, 8.0)]
    assert agreements[0] > agreements[1] > agreements[2], agreements
    assert agreements[0] > 0.85 and 0.45 < agreements[2] < 0.6, agreements
