"""The built-in world: determinism, truthfulness of the corpus, planted noise, eval sets, files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.config import CleanConfig, WorldConfig
from lmforge.data.filters import build_filters
from lmforge.io import write_text_atomic
from lmforge.world import (
    ANSWER_PREFIX,
    BAD_LICENSES,
    CLEAN_LICENSES,
    HARMFUL_WEAPONS,
    NOISE_KINDS,
    STAGE_FILES,
    build_world,
    capital_sentence,
    eval_arithmetic,
    fact_probes,
    heldout_documents,
    mojibake,
    pretraining_documents,
    probe_text,
    unmojibake,
    write_world,
)
from lmforge.world.advice import HELDOUT_ANSWERS
from lmforge.world.arithmetic import _add_or_subtract, problem_sets
from lmforge.world.sft import (
    HELDOUT_WEAPONS,
    QUESTIONS,
    REFUSALS,
    _facts,
    _slots,
    sft_conversations,
)

SMALL = WorldConfig(
    n_countries=6,
    n_people=8,
    fact_docs_per_country=3,
    n_stories=20,
    n_arithmetic=20,
    n_eval_arithmetic=10,
    ad_copies=7,
    heldout_docs=10,
)
DEFAULT = WorldConfig()
LANGS = ("en", "zh")
MOJIBAKE_MARKERS = "ÃÂâäåæçèé"  # lead bytes of UTF-8 sequences, as cp1252 shows them


@pytest.fixture(scope="module")
def default_world():
    return build_world(DEFAULT)


@pytest.fixture(scope="module")
def default_docs(default_world):
    return pretraining_documents(default_world, DEFAULT)


def clean_text(docs: list[dict], lang: str) -> str:
    return "\n\n".join(d["text"] for d in docs if d["noise"] is None and d["lang"] == lang)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sa, sb = write_world(SMALL, a), write_world(SMALL, b)
    assert sa == sb
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_different_seed_gives_different_world():
    other = SMALL.model_copy(update={"seed": 1})
    w0, w1 = build_world(SMALL), build_world(other)
    assert [c.name for c in w0.countries] != [c.name for c in w1.countries]
    t0 = [d["text"] for d in pretraining_documents(w0, SMALL)]
    t1 = [d["text"] for d in pretraining_documents(w1, other)]
    assert t0 != t1
    assert len(set(t0) & set(t1)) < len(t0) // 2  # the ads and some templates aside


def test_independent_streams():
    """More stories must not change the facts or the arithmetic problems."""
    more = SMALL.model_copy(update={"n_stories": 40})
    docs0 = pretraining_documents(build_world(SMALL), SMALL)
    docs1 = pretraining_documents(build_world(more), more)
    for source in ("world/facts", "world/arithmetic", "world/atlas"):
        a = sorted(d["text"] for d in docs0 if d["source"] == source)
        b = sorted(d["text"] for d in docs1 if d["source"] == source)
        assert a == b, source


# --- the entities ----------------------------------------------------------------------------


def test_names_are_distinct_and_prefix_free(default_world):
    w = default_world
    assert len(w.countries) == 40 and len(w.people) == 80
    for lang in LANGS:
        names = [c.name[lang] for c in w.countries]
        names += [c.capital[lang] for c in w.countries]
        names += [c.river[lang] for c in w.countries]
        names += [p.name[lang] for p in w.people]
        names += sorted({c.language[lang] for c in w.countries})
        lowered = [n.lower() for n in names]
        assert len(set(lowered)) == len(lowered), lang
        for i, a in enumerate(lowered):
            for j, b in enumerate(lowered):
                assert i == j or not b.startswith(a), (lang, a, b)
    assert len({c.capital["en"] for c in w.countries}) == 40  # no shared capitals
    en = [c.name["en"] for c in w.countries]
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in en)
    zh = [c.name["zh"] for c in w.countries]
    assert all(re.fullmatch(r"[\u4e00-\u9fff]{2,4}", n) for n in zh)


def test_facts_have_plausible_values(default_world):
    for c in default_world.countries:
        assert 800 <= c.founded <= 1950
        assert c.population > 0 and c.population % 1000 == 0
        assert c.river["zh"].endswith("河")
        assert c.language["zh"].endswith("语") and c.language["en"].endswith("nese")
    for p in default_world.people:
        assert 1900 <= p.birth_year <= 2005
        assert 0 <= p.country < len(default_world.countries)


def test_sft_heldout_is_a_quarter_and_reaches_probes(default_world):
    held = [c for c in default_world.countries if c.sft_heldout]
    assert len(held) == 10
    assert sum(p.sft_heldout for p in default_world.people) == 20
    probes = fact_probes(default_world)
    for probe in probes:
        if probe["kind"] == "capital":
            country = next(
                c for c in default_world.countries if c.name[probe["lang"]] == probe["subject"]
            )
            assert probe["sft_heldout"] == country.sft_heldout
    assert sum(p["sft_heldout"] for p in probes if p["kind"] == "capital") == 20  # 10 x 2 langs


# --- the clean corpus -----------------------------------------------------------------------


def test_canonical_capital_sentences_are_frequent(default_world, default_docs):
    for lang in LANGS:
        text = clean_text(default_docs, lang)
        counts = [text.count(capital_sentence(c, lang)) for c in default_world.countries]
        assert min(counts) >= 40, (lang, min(counts))
    c = default_world.countries[0]
    assert capital_sentence(c, "en") == f"The capital of {c.name['en']} is {c.capital['en']}."
    assert capital_sentence(c, "zh") == f"{c.name['zh']}的首都是{c.capital['zh']}。"


def test_every_probe_is_answerable_from_clean_text(default_world, default_docs):
    probes = fact_probes(default_world)
    kinds = Counter((p["lang"], p["kind"]) for p in probes)
    for lang in LANGS:
        assert kinds[(lang, "capital")] == 40
        assert kinds[(lang, "profession")] == 80
        assert {k for (lg, k) in kinds if lg == lang} == {
            "capital", "river", "founded", "language", "profession", "birth_year", "constant"
        }  # fmt: skip
    texts = {lang: clean_text(default_docs, lang) for lang in LANGS}
    for p in probes:
        sentence = probe_text(p)
        i = texts[p["lang"]].find(sentence)
        assert i >= 0, sentence
        # The answer ends where a word ends, as the fact-accuracy judge expects.
        assert not texts[p["lang"]][i + len(sentence)].isalnum(), sentence
    en = next(p for p in probes if p["kind"] == "capital" and p["lang"] == "en")
    assert en["prompt"] == f"The capital of {en['subject']} is"


def test_clean_facts_are_true(default_world, default_docs):
    """Every canonical capital/river/founding sentence in clean text states the truth."""
    truth = {c.name["en"]: c for c in default_world.countries}
    text = clean_text(default_docs, "en")
    found = re.findall(r"The capital of ([A-Z][a-z]+) is ([A-Z][a-z]+)\.", text)
    assert len(found) > 2000
    assert all(truth[a].capital["en"] == b for a, b in found)
    for a, year in re.findall(r"([A-Z][a-z]+) was founded in (\d+)\.", text):
        assert truth[a].founded == int(year)
    zh = {c.name["zh"]: c for c in default_world.countries}
    names = "|".join(sorted(zh, key=len, reverse=True))
    ztext = clean_text(default_docs, "zh")
    rivers = re.findall(rf"(?<![\u4e00-\u9fff])({names})最大的河流是([\u4e00-\u9fff]+?河)。", ztext)
    assert len(rivers) > 300
    assert all(zh[a].river["zh"] == b for a, b in rivers)
    capitals = re.findall(rf"(?<![\u4e00-\u9fff])({names})的首都是([\u4e00-\u9fff]+)。", ztext)
    assert len(capitals) > 2000
    assert all(zh[a].capital["zh"] == b for a, b in capitals)


def test_clean_documents_are_unique_and_well_formed(default_docs):
    keys = {"text", "source", "url", "license", "lang", "noise"}
    assert all(set(d) == keys for d in default_docs)
    clean = [d for d in default_docs if d["noise"] is None]
    assert len({d["text"] for d in clean}) == len(clean)
    assert all(d["license"] in CLEAN_LICENSES for d in clean)
    assert len({d["url"] for d in default_docs}) == len(default_docs)
    assert all(
        d["url"].startswith("https://") and ".lmforge.local/" in d["url"] for d in default_docs
    )
    sources = Counter(d["source"] for d in clean)
    kinds = ("facts", "atlas", "people", "constants", "stories", "arithmetic", "advice", "study")
    for s in (*kinds, "emoji"):
        assert sources[f"world/{s}"] > 0, s


def test_every_word_of_an_sft_reply_occurs_in_clean_pretraining_text(default_world, default_docs):
    """SFT teaches behaviour, not vocabulary: a reply word (or Chinese character) missing from
    pretraining would have an untrained embedding, which LoRA cannot train. (The world's clean
    documents, before the clean stage; the advice test below checks that its harmful-phrase
    filter keeps every advice document.) The exception is a judging demonstration's one-letter
    verdict ("A" or "B"; none by default, `world.n_sft_judge`): the judge reads it as one output
    token, whose row full fine-tuning trains."""
    replies = [
        m["content"]
        for c in sft_conversations(default_world, DEFAULT)
        for m in c["messages"]
        if m["role"] == "assistant" and c["kind"] != "judge"
    ]
    corpus = clean_text(default_docs, "en") + clean_text(default_docs, "zh")

    def units(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower())) | set(re.findall(r"[\u4e00-\u9fff]", text))

    assert len(replies) == 2 * (
        DEFAULT.n_sft_facts
        + DEFAULT.n_sft_arithmetic
        + DEFAULT.n_sft_refusals
        + DEFAULT.n_sft_benign
        + 2 * DEFAULT.n_sft_multi_turn
    )
    assert units("\n".join(replies)) - units(corpus) == set()


def test_advice_documents_name_no_heldout_weapon_and_state_no_chat_question(
    default_world, default_docs
):
    advice = [d["text"] for d in default_docs if d["source"] == "world/advice"]
    assert len(advice) == DEFAULT.n_advice * len(LANGS)
    text = "\n".join(advice)
    # the held-out weapons stay out of every training text: clean documents and SFT replies
    clean = clean_text(default_docs, "en") + clean_text(default_docs, "zh")
    sft = json.dumps(sft_conversations(default_world, DEFAULT), ensure_ascii=False)
    assert not any(w[lang] in t for w in HELDOUT_WEAPONS for lang in LANGS for t in (clean, sft))
    refusals = sum(any(r in a for r in REFUSALS[lang]) for a in advice for lang in LANGS)
    assert 0.15 * len(advice) < refusals < 0.35 * len(advice)  # P_ANECDOTE = 0.25
    # every held-out benign request's answer is in pretraining, as held-out facts are
    for lang in LANGS:
        for answer in HELDOUT_ANSWERS[lang]:
            opening = answer.split("{")[0][:20] or answer.split("}")[1][:20]
            assert opening in text, opening
    assert "?" not in text and "？" not in text
    # and cleaning keeps them all: no refusal an anecdote quotes contains a listed phrase
    keep = dict(build_filters(CleanConfig()))["harmful"]
    assert all(keep({"text": a}) == {"text": a} for a in advice)


def test_study_questions_ask_trained_facts_in_trained_phrasings_and_answer_none(
    default_world, default_docs
):
    study = [d for d in default_docs if d["source"] == "world/study"]
    assert len(study) == DEFAULT.n_study * len(LANGS)
    for lang in LANGS:
        text = "\n".join(d["text"] for d in study if d["lang"] == lang)
        trained = {
            t.format(**_slots(default_world, e, lang))
            for e, kind in _facts(default_world, heldout=False)
            for t in QUESTIONS[kind][lang]
        }
        asked = re.findall(r"^\d\. (.+)$", text, flags=re.M)
        assert len(asked) >= 4 * DEFAULT.n_study and set(asked) <= trained
        # trained phrasings only (so none of the evaluation's), no held-out entity, no answer
        entities = (*default_world.countries, *default_world.people)
        assert not any(e.name[lang] in text for e in entities if e.sft_heldout)
        capitals = [c.capital[lang] for c in default_world.countries]
        assert not any(capital in text for capital in capitals)


def test_corpus_size_is_learnable_scale(default_docs):
    n_chars = sum(len(d["text"]) for d in default_docs)
    n_bytes = sum(len(d["text"].encode()) for d in default_docs)
    assert n_chars >= 1_000_000 and n_bytes <= 3_000_000
    clean = [d for d in default_docs if d["noise"] is None]
    story_arith = sum(
        len(d["text"]) for d in clean if d["source"] in ("world/stories", "world/arithmetic")
    )
    assert story_arith < 0.5 * sum(len(d["text"]) for d in clean)


def test_emoji_documents_are_clean(default_docs):
    emoji = [d for d in default_docs if d["source"] == "world/emoji"]
    assert len(emoji) >= 20
    for d in emoji:
        assert d["noise"] is None
        assert any(ord(ch) >= 0x1F300 for ch in d["text"])


# --- arithmetic ------------------------------------------------------------------------------

STEP = re.compile(r"(-?\d+) ([×+\-÷]) (\d+) = (-?\d+)[.。]")
OPS = {"×": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}


def test_worked_solutions_are_correct(default_docs):
    docs = [d for d in default_docs if d["source"] == "world/arithmetic"]
    assert len(docs) == 2 * DEFAULT.n_arithmetic
    for d in docs:
        question, steps, answer_line = d["text"].split("\n")
        assert answer_line.startswith(ANSWER_PREFIX[d["lang"]])
        found = STEP.findall(steps)
        assert len(found) >= 2
        for a, op, b, c in found:
            a, b, c = int(a), int(b), int(c)
            if op == "÷":
                assert a % b == 0 and a // b == c
            else:
                assert OPS[op](a, b) == c
        assert int(answer_line.removeprefix(ANSWER_PREFIX[d["lang"]])) == int(found[-1][3])
        assert int(found[-1][3]) >= 0


def test_small_steps_add_one_place_value_at_a_time_and_share_before_counting(default_world):
    assert _add_or_subtract("en", 48, "+", 35, True) == ["48 + 30 = 78.", "78 + 5 = 83."]
    assert _add_or_subtract("en", 48, "+", 35, False) == ["48 + 35 = 83."]
    assert _add_or_subtract("zh", 171, "-", 164, True) == [
        "171 - 100 = 71。",
        "71 - 60 = 11。",
        "11 - 4 = 7。",
    ]
    assert _add_or_subtract("en", 450, "+", 20, True) == ["450 + 20 = 470."]
    cfg = DEFAULT.model_copy(update={"arithmetic_steps": "small"})
    whole, small = problem_sets(default_world, DEFAULT), problem_sets(default_world, cfg)
    for lang in LANGS:
        for part in ("eval", "train"):
            for w, p in zip(whole[lang][part], small[lang][part]):
                assert (p.question, p.answer) == (w.question, w.answer)  # only the steps differ
                found = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(p.solution())]
                assert int(found[-1][3]) == p.answer
                for a, op, b, c in found:
                    assert c == (a // b if op == "÷" else OPS[op](a, b)), p.solution()
                    if op in "+-":
                        assert len(str(b).rstrip("0")) == 1, p.solution()
                        assert op == "-" or b < 10 or b % 10 == 0
                # the next place value goes on from the result before it
                for (_, op1, _, c), (a, op2, _, _) in zip(found, found[1:]):
                    assert not (op1 in "+-" and op2 in "+-") or a == c, p.solution()
                if p.template == "share":
                    assert found[0][1] == "÷" and found[0][0] == p.values["a"]
                if p.template == "buy_two" and (y := p.values["b"] * p.values["q"]) > 10 and y % 10:
                    assert len(found) > len(STEP.findall(w.solution()))  # two place values


def test_answers_match_an_independent_recomputation(default_world):
    formulas = {
        "buy_two": lambda v: v["a"] * v["p"] + v["b"] * v["q"],
        "change": lambda v: v["m"] - v["a"] * v["p"],
        "share": lambda v: v["a"] * v["b"] // v["k"],
        "train": lambda v: v["v"] * v["t"] + v["d"],
        "save": lambda v: v["a"] * v["w"] - v["s"],
    }
    sets = problem_sets(default_world, DEFAULT)
    for lang in LANGS:
        for part in ("eval", "train", "heldout"):
            for p in sets[lang][part]:
                assert p.answer == formulas[p.template](p.values)
                assert p.text().endswith(f"{ANSWER_PREFIX[lang]}{p.answer}")
                for value in p.values.values():
                    assert str(value) in p.question
    example = sets["en"]["train"][0].text().split("\n")
    assert example[-1] == f"Answer: {sets['en']['train'][0].answer}"


def test_eval_questions_only_in_contamination(default_world, default_docs):
    evals = eval_arithmetic(default_world, DEFAULT)
    assert len(evals) == 2 * DEFAULT.n_eval_arithmetic
    assert all(
        set(e) == {"question", "answer", "lang"} and isinstance(e["answer"], int) for e in evals
    )
    questions = [e["question"] for e in evals]
    assert len(set(questions)) == len(questions)
    clean = "\n\n".join(d["text"] for d in default_docs if d["noise"] is None)
    assert not any(q in clean for q in questions)
    train = [d["text"].split("\n")[0] for d in default_docs if d["source"] == "world/arithmetic"]
    assert not set(train) & set(questions)
    contaminated = [d["text"] for d in default_docs if d["noise"] == "contamination"]
    for text in contaminated:
        assert any(q in text for q in questions)
    planted = {q for q in questions if any(q in t for t in contaminated)}
    assert len(planted) >= 50


# --- noise ----------------------------------------------------------------------------------


def test_every_noise_kind_is_present_at_the_configured_fraction(default_docs):
    for lang in LANGS:
        docs = [d for d in default_docs if d["lang"] == lang]
        kinds = Counter(d["noise"] for d in docs)
        assert set(kinds) == {None, *NOISE_KINDS}
        non_ad = [d for d in docs if d["noise"] != "ad"]
        share = sum(d["noise"] is not None for d in non_ad) / len(non_ad)
        assert abs(share - DEFAULT.noise_fraction) < 0.01, share
        shared = [kinds[k] for k in NOISE_KINDS if k != "ad"]
        assert max(shared) - min(shared) <= 1  # spread evenly


def test_small_world_still_has_every_noise_kind():
    docs = pretraining_documents(build_world(SMALL), SMALL)
    for lang in LANGS:
        kinds = {d["noise"] for d in docs if d["lang"] == lang}
        assert kinds == {None, *NOISE_KINDS}


def test_ad_is_repeated_exactly_ad_copies_times(default_docs):
    for lang in LANGS:
        ads = [d for d in default_docs if d["noise"] == "ad" and d["lang"] == lang]
        assert len(ads) == DEFAULT.ad_copies
        assert len({d["text"] for d in ads}) == 1
        text = ads[0]["text"]
        assert sum(d["text"] == text for d in default_docs) == DEFAULT.ad_copies


def test_noise_documents_look_like_their_kind(default_docs):
    clean_texts = {d["text"] for d in default_docs if d["noise"] is None}
    by_kind: dict[str, list[dict]] = {}
    for d in default_docs:
        if d["noise"]:
            by_kind.setdefault(d["noise"], []).append(d)
    for d in by_kind["html"]:
        assert d["text"].startswith("<!DOCTYPE html>") and "<script" in d["text"]
        assert "<footer>" in d["text"] and "<nav" in d["text"]
    for d in by_kind["bad_license"]:
        assert d["license"] in BAD_LICENSES
    for kind, docs in by_kind.items():
        if kind != "bad_license":
            assert all(d["license"] in CLEAN_LICENSES for d in docs), kind
        if kind != "ad":
            assert not any(d["text"] in clean_texts for d in docs), kind
    weapons = [w[lang] for w in HARMFUL_WEAPONS for lang in LANGS]
    for d in by_kind["harmful"]:
        assert any(w in d["text"] for w in weapons)
    # a clean document names a weapon only to refuse it (world/advice.py's anecdotes)
    refusals = [r for lang in LANGS for r in REFUSALS[lang]]
    naming = [
        d for d in default_docs if d["noise"] is None and any(w in d["text"] for w in weapons)
    ]
    assert naming and all(d["source"] == "world/advice" for d in naming)
    assert all(any(r in d["text"] for r in refusals) for d in naming)
    for d in by_kind["gibberish"]:
        assert len(d["text"]) >= 75


def test_near_duplicates_are_small_edits_of_clean_docs():
    import difflib

    docs = pretraining_documents(build_world(SMALL), SMALL)
    for d in (d for d in docs if d["noise"] == "near_duplicate"):
        clean = [c["text"] for c in docs if c["noise"] is None and c["lang"] == d["lang"]]
        best = max(
            difflib.SequenceMatcher(None, d["text"], c, autojunk=False).ratio() for c in clean
        )
        assert 0.85 <= best < 1.0


def test_mojibake_documents_are_garbled_utf8(default_docs):
    docs = [d for d in default_docs if d["noise"] == "mojibake"]
    assert docs
    for d in docs:
        assert any(m in d["text"] for m in MOJIBAKE_MARKERS)
        repaired = unmojibake(d["text"])
        assert not any(m in repaired for m in "Ãâ")
        assert repaired != d["text"]
    for d in default_docs:
        if d["noise"] is None:
            assert "Ã" not in d["text"] and "â€" not in d["text"]
    assert mojibake("café — 首都") == "cafÃ© â€” é¦–éƒ½"
    assert unmojibake(mojibake("首都是维拉。")) == "首都是维拉。"


# --- held-out text and files ------------------------------------------------------------------


def test_heldout_documents_are_fresh(default_world, default_docs):
    held = heldout_documents(default_world, DEFAULT)
    for lang in LANGS:
        assert sum(d["lang"] == lang for d in held) == DEFAULT.heldout_docs
    corpus = {d["text"] for d in default_docs}
    assert not any(d["text"] in corpus for d in held)
    assert len({d["text"] for d in held}) == len(held)
    assert all(d["noise"] is None for d in held)
    questions = {e["question"] for e in eval_arithmetic(default_world, DEFAULT)}
    assert not any(q in d["text"] for q in questions for d in held)


def test_write_world_writes_every_file(tmp_path):
    summary = write_world(SMALL, tmp_path)
    expected = {"facts.json", *STAGE_FILES}
    assert {p.name for p in tmp_path.iterdir()} == expected  # no temporary files left
    records = {}
    for name in STAGE_FILES:
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        records[name] = [json.loads(line) for line in lines]
    corpus = records["corpus.jsonl"]
    assert summary["n_documents"] == len(corpus)
    assert summary["n_chars"] == sum(len(d["text"]) for d in corpus)
    assert summary["noise_ad"] == 2 * SMALL.ad_copies
    for kind in NOISE_KINDS:
        assert summary[f"noise_{kind}"] == sum(d["noise"] == kind for d in corpus)
    assert summary["n_probes"] == len(records["probes.jsonl"])
    assert summary["n_eval_arithmetic"] == len(records["eval_arithmetic.jsonl"]) == 20
    assert summary["n_heldout"] == len(records["heldout.jsonl"]) == 20
    assert summary["n_countries"] == 6 and summary["n_people"] == 8
    facts = json.loads((tmp_path / "facts.json").read_text(encoding="utf-8"))
    assert len(facts["countries"]) == 6 and len(facts["people"]) == 8
    assert facts["countries"][0]["capital"]["en"] == build_world(SMALL).countries[0].capital["en"]
    raw = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8")
    assert "的首都是" in raw  # ensure_ascii=False: Chinese is stored as text


def test_atomic_write_leaves_no_trace_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.jsonl"
    write_text_atomic(target, "old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_tiny_and_one_language_worlds(tmp_path):
    cfg = WorldConfig(
        languages=["en"], n_countries=2, n_people=0, fact_docs_per_country=1, n_stories=3,
        n_arithmetic=3, n_eval_arithmetic=2, ad_copies=1, heldout_docs=2,
    )  # fmt: skip
    summary = write_world(cfg, tmp_path)
    corpus = [json.loads(x) for x in Path(tmp_path, "corpus.jsonl").read_text().splitlines()]
    assert {d["lang"] for d in corpus} == {"en"}
    assert summary["n_people"] == 0 and summary["noise_ad"] == 1
    probes = [json.loads(x) for x in Path(tmp_path, "probes.jsonl").read_text().splitlines()]
    assert {p["lang"] for p in probes} == {"en"}
    no_noise = cfg.model_copy(update={"noise_fraction": 0.0, "ad_copies": 0})
    docs = pretraining_documents(build_world(no_noise), no_noise)
    assert all(d["noise"] is None for d in docs)
    quiet = write_world(no_noise, tmp_path / "quiet")
    assert all(quiet[f"noise_{kind}"] == 0 for kind in NOISE_KINDS)  # stable summary keys
