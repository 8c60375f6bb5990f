"""The clean stage: each filter alone, dedup, decontamination, mixing, readers, determinism
across worker counts, and the acceptance run on the built-in world's raw corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import CleanConfig, ConfigError, load_config
from lmforge.data.decontam import EvalItem, NgramIndex, decontaminate, load_eval_items
from lmforge.data.dedup import (
    Entry,
    containment,
    deduplicate,
    exact_key,
    minhash,
    repeated_paragraphs,
    strip_paragraphs,
)
from lmforge.data.filters import (
    apply_filters,
    build_filters,
    ends_sentence,
    fix_unicode,
    harmful,
    html_to_text,
    language,
    license_allowlist,
    load_classifier,
    quality,
    quality_reason,
)
from lmforge.data.mixing import copies, weight_for
from lmforge.data.readers import DataError, SkipReport, corpus_files, read_records, read_texts
from lmforge.data.text import normalize, units
from lmforge.pipeline import run_pipeline
from lmforge.stages import clean
from lmforge.world.noise import NOISE_KINDS, mojibake

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
CFG = CleanConfig()
EN = (
    "The river runs through the old town. People walk along it every evening, and the "
    "children feed the ducks. It is a quiet place to rest."
)
ZH = "每年夏天，河边都会举办风筝节。孩子们在草地上放风筝，大人们坐在树下聊天。这是一个安静的地方。"


def doc(text: str, **meta) -> dict:
    return {"text": text, **meta}


# ---- filters, one at a time ------------------------------------------------------------------
PAGE = """<!DOCTYPE html><html><head><title>Rivers | Wiki</title>
<script>var tracker = 'UA-1-1'; function gtag(){}</script><style>body{color:red}</style></head>
<body><nav class="nav"><a href="/">Home</a> | <a href="/login">Log in</a></nav>
<div class="content"><h1>Rivers</h1><p>The river runs through the old town &amp; the park.</p>
<p>People walk along it every evening.</p></div>
<footer>&copy; 2024 Wiki. All rights reserved. | <a href="/privacy">Privacy policy</a></footer>
</body></html>"""


def test_html_to_text_keeps_paragraphs_and_drops_boilerplate():
    out = html_to_text(doc(PAGE, source="web"))
    assert out["source"] == "web"
    lines = out["text"].split("\n")
    assert "The river runs through the old town & the park." in lines
    assert "People walk along it every evening." in lines
    for junk in ("Log in", "Home", "Privacy policy", "gtag", "color:red", "All rights reserved"):
        assert junk not in out["text"], junk
    plain = doc("Use <b>bold</b> for emphasis. " + EN)  # not a page: left alone
    assert html_to_text(plain) is plain
    assert (
        html_to_text(doc("<html><body><script>x()</script></body></html>")) == "html:no_main_text"
    )


def test_fix_unicode_repairs_mojibake_and_keeps_emoji():
    assert fix_unicode(doc("It isnâ€™t here"))["text"] == "It isn’t here"
    assert fix_unicode(doc("cafÃ©"))["text"] == "café"
    assert fix_unicode(doc(mojibake("首都是北京。")))["text"] == "首都是北京。"
    kept = "Fun! 😀 👍🏽 👨‍👩‍👧 🇨🇳 ❤️ “quoted” — ‘single’ 你好，世界！（全角）"
    d = doc(kept)
    assert fix_unicode(d) is d  # emoji, curly quotes and full-width punctuation survive


def test_license_allowlist_and_missing_policy():
    allowed = frozenset({"mit", "cc-by-4.0"})
    assert license_allowlist(doc("x", license="MIT"), allowed, "keep")["license"] == "MIT"
    assert license_allowlist(doc("x", license="proprietary"), allowed, "keep") == (
        "license:not_allowed"
    )
    assert license_allowlist(doc("x"), allowed, "keep") == doc("x")
    assert license_allowlist(doc("x", license=""), allowed, "drop") == "license:missing"


def test_language_allowlist_sets_lang():
    assert language(doc(EN), ("en", "zh"), 0.15)["lang"] == "en"
    assert language(doc(ZH), ("en", "zh"), 0.15)["lang"] == "zh"
    french = (
        "Le chat dort sur la chaise pendant que les enfants jouent dans le jardin avec leurs amis."
    )
    assert language(doc(french), ("en", "zh"), 0.15) == "language:not_allowed"
    soup = "%1hmffd52v* aqxtyqdy*9 19b jqug*e x01wotfe pzbhga cqpmpjsv ll7j41 3yf@c2qvh qqoxbbkye"
    assert language(doc(soup), ("en", "zh"), 0.15) == "language:not_allowed"
    assert language(doc(french), ("fr",), 0.5)["lang"] == "fr"


def test_harmful_phrases_and_classifier_hook():
    phrases = tuple(normalize(p) for ps in CFG.harmful_phrases.values() for p in ps)
    bad = "Weapon   RECIPE: mix the powder, then throw it at your enemies."
    assert harmful(doc(bad), phrases) == "harmful:phrase"
    assert harmful(doc("先把粉末磨细。把它扔向敌人，让他们受伤。"), phrases) == "harmful:phrase"
    assert harmful(doc(EN), phrases) == doc(EN)
    flag_ducks = lambda text: float("ducks" in text)  # noqa: E731
    assert harmful(doc(EN), (), flag_ducks, 0.5) == "harmful:classifier"
    assert load_classifier("os.path:basename")("/a/b") == "b"
    with pytest.raises(ConfigError, match="harmful_classifier"):
        load_classifier("no_such_module:f")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Too short to keep.", "too_short"),
        (
            "supercalifragilistic " * 3 + "antidisestablishmentarianism is the word.",
            "mean_word_length",
        ),
        ("#one #two #three #four #five #six is the list of all the tags.", "symbol_ratio"),
        ("1234 5678 9012 3456 7890 1122 3344 is the of 5566.", "alpha_words"),
        ("best cheap buy now free discount deal price sale winner bonus offer.", "stop_words"),
        (
            "the dog of the cat and the bird\nthe cat of the dog\nand to the fish",
            "punctuation_lines",
        ),
        ("\n".join(["The dog is in the house."] * 4 + ["It is a good dog."]), "duplicate_lines"),
        ("wonderful amazing product " * 20 + "is the best.", "top_ngram"),
        (
            "饑，邨輩嵤筊翓疚缴錋螏挐骉〇衆鯀忼棯螑諐赋阓箅硕籢夺悵汝佖埋擳鵁萱澷迡铵憫琥。",
            "rare_chars",
        ),
        ("你好。", "too_short"),
    ],
)
def test_quality_rules_each_catch_their_case(text, reason):
    assert quality_reason(text, CFG) == reason
    assert quality(doc(text), CFG) == f"quality:{reason}"


def test_quality_keeps_prose_chinese_poetry_and_emoji():
    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    tang = "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。"  # traditional, no function words
    emoji = "Day 3 of my trip 🌍✈️\nThe capital is lovely. 🏙️ Everyone is so kind! 😊"
    for text in (EN, ZH, poem, tang, emoji):
        assert quality_reason(text, CFG) is None, text
    assert ends_sentence("so kind! 😊") and not ends_sentence("my trip 🌍✈️")


def test_apply_filters_runs_in_order_and_reports_repairs():
    filters = build_filters(CFG)
    assert [name for name, _ in filters] == [
        "html",
        "unicode",
        "license",
        "language",
        "harmful",
        "quality",
    ]
    page = PAGE.replace("old town", "old town’s heart").encode("utf-8").decode("cp1252")
    out, changed = apply_filters(doc(page, license="MIT"), filters)
    assert changed == ["html", "unicode"] and "old town’s heart" in out["text"]
    assert apply_filters(doc(EN, license="proprietary"), filters)[0] == "license:not_allowed"
    off = build_filters(CFG.model_copy(update={"html": False, "licenses": [], "languages": []}))
    assert [name for name, _ in off] == ["unicode", "harmful", "quality"]


# ---- dedup, decontamination, mixing ------------------------------------------------------------
def _entries(texts: list[str], cfg: CleanConfig = CFG) -> list[Entry]:
    return [
        Entry(i, len(t), exact_key(t), minhash(t, cfg.num_perm, cfg.shingle_size))
        for i, t in enumerate(texts)
    ]


def test_exact_and_near_dedup_keep_the_shortest_copy():
    story = (
        "Guli Movu and Fufa Zerano met on a ship to Pivaku. Guli Movu is a miner from Zavubi, "
        "and Fufa Zerano is a potter from Zavubi. They talked about their countries all night."
    )
    texts = [
        story + "\nShared from the archive.",  # a mirror's copy, read first
        story,
        "  " + story.upper().replace(" ", "   ") + " ",  # the same text up to case and spacing
        story.replace("Guli Movu", "Dema Naka"),  # templated: another person, not a copy
        EN,
    ]
    dropped = deduplicate(_entries(texts), 0.5, CFG.num_perm, 0.97, lambda i: texts[i])
    assert dropped == {0: ("dedup:near", 1), 2: ("dedup:exact", 1)}
    # Jaccard alone also merges the templated text
    loose = deduplicate(_entries(texts), 0.5, CFG.num_perm)
    assert loose[3] == ("dedup:near", 1)
    assert exact_key("Hello  World") == exact_key("hello world\n")
    assert containment(units("a b c d"), units("a b x c d e")) == 1.0


def test_boilerplate_paragraphs_are_removed_everywhere():
    notice = "We use cookies to improve your experience on this site."
    texts = [f"Story number {i} is here.\n{notice}" for i in range(5)] + ["Alone.\nShort."]
    boiler = repeated_paragraphs(texts, min_docs=3, min_chars=20)
    assert len(boiler) == 1
    assert strip_paragraphs(texts[0], boiler) == "Story number 0 is here."
    assert strip_paragraphs(texts[-1], boiler) == texts[-1]


def test_decontamination_finds_items_and_ignores_template_ngrams():
    items = [
        EvalItem("eval", 0, "Xiaoming buys 3 apples at 2 yuan and 4 oranges at 1 yuan. How much does he pay in total?"),
        EvalItem("eval", 1, "小美每周存6元，存了6周，然后花了26元买铅笔。小美还剩多少元？"),
        EvalItem("eval", 2, "Lily has 5 red balloons and 7 blue balloons. How much does he pay in total?"),
    ]  # fmt: skip
    index = NgramIndex(items, n=13, max_items=1, min_coverage=0.7)
    page = f"Homework answers\n1. {items[0].text}\nAnswer: 10\n2. {items[1].text}\n答案：10"
    found, lines = index.matches(page)
    assert found == {0, 1} and lines == {1, 3}
    # a training problem from the same template shares n-grams but is not the item
    near = (
        "Xiaoming buys 5 apples at 2 yuan and 4 oranges at 3 yuan. How much does he pay in total?"
    )
    assert index.matches(near)[0] == set()
    assert decontaminate(doc(page), lines, "drop") == "decontam:eval_overlap"
    assert (
        decontaminate(doc(page), lines, "redact")["text"]
        == "Homework answers\nAnswer: 10\n答案：10"
    )
    assert decontaminate(doc(EN), set(), "drop") == doc(EN)
    assert units("小美存6元, Hello World!") == ["小", "美", "存", "6", "元", "hello", "world"]


def test_eval_set_spec_is_path_and_field(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "q1"}\n{"question": "q2"}\n', encoding="utf-8")
    assert [i.text for i in load_eval_items([f"{path}:question"])] == ["q1", "q2"]
    with pytest.raises(ConfigError, match="PATH:FIELD"):
        load_eval_items([str(path)])
    with pytest.raises(ConfigError, match="'answer'"):
        load_eval_items([f"{path}:answer"])


def test_mixing_weights():
    mix = {"web": 0.5, "web/wiki": 3.0, "world/stories": 2.0}
    assert weight_for("web/wiki", mix) == 3.0 and weight_for("web/crawl", mix) == 0.5
    assert weight_for("webby", mix) == 1.0 and weight_for("world/stories", mix) == 2.0
    assert copies(2.0, "x", 0) == 2 and copies(0.0, "x", 0) == 0
    halves = [copies(0.5, f"doc {i}", 0) for i in range(2000)]
    assert 900 < sum(halves) < 1100 and halves == [copies(0.5, f"doc {i}", 0) for i in range(2000)]


# ---- readers -----------------------------------------------------------------------------------
def test_txt_blocks_and_html_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first block\nline two\n\n\nsecond block\n", encoding="utf-8")
    got = list(read_records(txt, txt_mode="blocks"))
    assert got == [
        (f"{txt}:1", {"text": "first block\nline two"}),
        (f"{txt}:5", {"text": "second block"}),
    ]
    assert [r["text"] for _, r in read_records(txt)] == [txt.read_text()]
    page = tmp_path / "p.html"
    page.write_text(PAGE, encoding="utf-8")
    assert list(read_records(page)) == [(f"{page}:1", {"text": PAGE})]
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"ok\n\xff\xfe\nfine\n")
    with pytest.raises(DataError, match=r"b.txt:2: not valid UTF-8"):
        list(read_records(bad, txt_mode="blocks"))
    skips = SkipReport()
    assert [r["text"] for _, r in read_records(bad, skips, "blocks")] == ["ok\nfine"]
    assert skips.skipped == [(f"{bad}:2", "not valid UTF-8")]


# ---- the stage ---------------------------------------------------------------------------------
def _clean(out: Path, *overrides: str) -> dict:
    cfg = load_config(TINY, ["stages=['world', 'clean']", *overrides])
    return run_pipeline(cfg, out)["clean"]


def test_malformed_record_fails_with_file_and_line_or_is_counted(tmp_path):
    data = tmp_path / "raw.jsonl"
    data.write_text(
        json.dumps({"text": EN, "license": "MIT"})
        + "\n{broken\n"
        + json.dumps({"txt": "x"})
        + "\n",
        encoding="utf-8",
    )
    cfg = load_config(None, [f"clean.inputs=['{data}']", "clean.eval_sets=[]"])
    with pytest.raises(DataError, match=r"raw.jsonl:2: not valid JSON"):
        clean.run(cfg, tmp_path / "run")
    cfg.clean.skip_bad = True
    summary = clean.run(cfg, tmp_path / "run")
    assert summary["skipped_bad"] == 2 and summary["docs_in"] == 1 and summary["docs_out"] == 1
    card = (tmp_path / "run" / "clean" / "DATA_CARD.md").read_text(encoding="utf-8")
    assert f"{data}:2" in card and f"{data}:3: record needs a string field 'text'" in card


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path):
    one = _clean(tmp_path / "w1", "clean.workers=1", "clean.chunk_size=16")
    two = _clean(tmp_path / "w2", "clean.workers=2", "clean.chunk_size=16")
    a = (tmp_path / "w1" / "clean" / "corpus" / "part-00000.jsonl").read_bytes()
    b = (tmp_path / "w2" / "clean" / "corpus" / "part-00000.jsonl").read_bytes()
    assert a == b and len(a) > 10_000
    assert {
        k: v for k, v in one.items() if k not in ("seconds", "mb_per_s", "workers", "device")
    } == {k: v for k, v in two.items() if k not in ("seconds", "mb_per_s", "workers", "device")}
    assert two["device"] == "cpu x 2"


def test_mixing_weights_repeat_sources(tmp_path):
    summary = _clean(tmp_path, 'clean.mix={"world/stories" = 3, "world/arithmetic" = 0}')
    rows = [
        json.loads(line) for line in (tmp_path / "clean" / "corpus" / "part-00000.jsonl").open()
    ]
    sources = [r["source"] for r in rows]
    assert "world/arithmetic" not in sources
    assert summary["docs_out"] == len(rows) > summary["docs_kept"]
    stories = sum(s == "world/stories" for s in sources)
    assert (
        stories % 3 == 0
        and len({r["text"] for r in rows if r["source"] == "world/stories"}) == stories // 3
    )
    card = (tmp_path / "clean" / "DATA_CARD.md").read_text(encoding="utf-8")
    assert "| world/stories | 3.0 |" in card and "| 3.0 |" in card


@pytest.fixture(scope="module")
def world_clean(tmp_path_factory) -> tuple[Path, dict]:
    """The default-size world, cleaned with the default config (two workers)."""
    out = tmp_path_factory.mktemp("world")
    cfg = load_config(None, ["stages=['world', 'clean']", "clean.workers=2"])
    return out, run_pipeline(cfg, out)["clean"]


def test_acceptance_every_noise_kind_is_removed(world_clean):
    out, summary = world_clean
    world = json.loads((out / "world" / "summary.json").read_text())
    assert summary["docs_in"] == world["n_documents"] > 10_000
    for kind in NOISE_KINDS:
        assert summary[f"recall_{kind}"] >= 0.95, (kind, summary)
    assert summary["false_drop_rate"] < 0.02, summary
    assert summary["clean_docs"] == world["n_clean"]
    assert summary["eval_items_found"] >= 0.9 * world["n_eval_arithmetic"] / 2
    for key in ("docs_out", "mb_per_s", "seconds", "device"):
        assert key in summary
    rows = [json.loads(t) for t in read_texts_raw(out / "clean" / "corpus")]
    assert len(rows) == summary["docs_out"] and all("noise" not in r for r in rows)
    texts = [r["text"] for r in rows]
    assert not any("<p>" in t or "â€" in t for t in texts)
    assert sum("😊" in t for t in texts) > 10  # emoji survive
    card = (out / "clean" / "DATA_CARD.md").read_text(encoding="utf-8")
    for section in ("Throughput", "per filter and reason", "noise labels", "Examples of dropped",
                    "Licences", "Duplicate clusters", "Decontamination", "Mixing"):  # fmt: skip
        assert f"## {section}" in card or section in card, section
    assert "recall" in card and "false_drop_rate" in card


def test_tokenizer_and_pretrain_read_the_cleaned_corpus(world_clean):
    from lmforge.runs import CORPUS_CANDIDATES

    out, _ = world_clean
    assert CORPUS_CANDIDATES[0] == "clean/corpus" and (out / CORPUS_CANDIDATES[0]).is_dir()


def read_texts_raw(directory: Path) -> list[str]:
    """Every line of every shard of a cleaned corpus, in order."""
    return [line for f in corpus_files(directory) for line in f.read_text("utf-8").splitlines()]


def test_output_is_split_into_shards_read_back_in_order(tmp_path):
    whole = _clean(tmp_path / "one")
    split = _clean(tmp_path / "many", "clean.shard_mb=0.05")
    parts = corpus_files(tmp_path / "many" / "clean" / "corpus")
    assert len(parts) >= 3 and all(p.stat().st_size <= 50_000 for p in parts[:-1])
    assert read_texts_raw(tmp_path / "many" / "clean" / "corpus") == read_texts_raw(
        tmp_path / "one" / "clean" / "corpus"
    )
    assert split["docs_out"] == whole["docs_out"]
    texts = list(read_texts(tmp_path / "many" / "clean" / "corpus"))
    assert len(texts) == whole["docs_out"]
    assert not list((tmp_path / "many" / "clean").glob(".corpus*"))  # no temp dir left
