"""The clean stage on real text from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import gzip
import json
import random
from itertools import islice
from pathlib import Path

import pytest

from lmforge.config import CleanConfig, load_config
from lmforge.data.dedup import Entry, deduplicate, exact_key, minhash, shingles
from lmforge.data.filters import quality_reason
from lmforge.data.readers import corpus_files
from lmforge.stages import clean

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")
STORIES = DATA / "tinystories_lowercased_prefix" / "tinystories.txt"


def _stories(n_chars: int) -> str:
    with open(STORIES, encoding="utf-8") as f:
        return f.read(n_chars).rsplit("\n", 1)[0] + "\n"


@needs_data
def test_tinystories_mojibake_is_repaired(tmp_path):
    raw = tmp_path / "stories.txt"
    raw.write_text(_stories(400_000), encoding="utf-8")
    assert raw.read_text(encoding="utf-8").count("â€") > 50
    cfg = load_config(None, [f"clean.inputs=['{raw}']", "clean.eval_sets=[]"])
    summary = clean.run(cfg, tmp_path / "run")
    text = "".join(
        f.read_text(encoding="utf-8") for f in corpus_files(tmp_path / "run" / "clean" / "corpus")
    )
    assert "â€" not in text and "’" in text
    assert summary["repaired_unicode"] > 50
    assert summary["docs_out"] > 0.9 * summary["docs_in"]  # the stories themselves stay


@needs_data
def test_chinese_poetry_passes_the_chinese_quality_rules():
    cfg = CleanConfig()
    with open(DATA / "chinese_poetry" / "songci_all.jsonl", encoding="utf-8") as f:
        songci = [json.loads(line) for line in islice(f, 2000)]
    with gzip.open(
        DATA / "chinese_poetry" / "tang_poems_all.jsonl.gz", "rt", encoding="utf-8"
    ) as f:
        tang = [json.loads(line) for line in islice(f, 2000)]  # traditional characters
    for poems in (songci, tang):
        reasons = [quality_reason("\n".join(p["paragraphs"]), cfg) for p in poems]
        failed = [r for r in reasons if r is not None]
        # the few failures are one-line fragments ("too_short")
        assert len(failed) / len(reasons) < 0.02, sorted(set(failed))


@needs_data
def test_gsm8k_questions_planted_in_a_corpus_are_found_and_removed(tmp_path):
    lines = (DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines]
    blocks = [b for b in _stories(600_000).split("\n") if len(b) > 200][:400]
    assert len(blocks) == 400
    rng = random.Random(0)
    planted = sorted(rng.sample(range(len(questions)), 40))
    docs = [{"text": b, "license": "CDLA-Sharing-1.0"} for b in blocks]
    for k, q in enumerate(planted):
        q_text = questions[q]["question"]
        docs[k * 10]["text"] += f"\nHomework help: {q_text}\n{questions[q]['answer']}"
        docs[k * 10]["planted"] = q
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"clean.inputs=['{corpus}']",
            f"clean.eval_sets=['{DATA / 'gsm8k' / 'test.jsonl'}:question']",
        ],
    )
    summary = clean.run(cfg, tmp_path / "run")
    assert summary["eval_items"] == len(questions) == 1319
    assert summary["eval_items_found"] == len(planted)
    assert summary["dropped_decontam_eval_overlap"] == len(planted)
    out = "".join(
        f.read_text(encoding="utf-8") for f in corpus_files(tmp_path / "run" / "clean" / "corpus")
    )
    kept = [json.loads(line) for line in out.splitlines()]
    assert not any("planted" in d for d in kept)
    card = (tmp_path / "run" / "clean" / "DATA_CARD.md").read_text(encoding="utf-8")
    assert f"test.jsonl:question item {planted[0]}" in card


@needs_data
def test_near_duplicates_in_hh_rlhf_pairs_are_found():
    path = DATA / "hh_rlhf" / "helpful-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        pairs = [json.loads(line) for line in islice(f, 400)]
    # dialogues: Jaccard alone decides (the shared turns are the copy, the last reply differs)
    cfg = CleanConfig(min_containment=0.0, jaccard_threshold=0.8, shingle_size=5)
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    entries = [
        Entry(i, len(t), exact_key(t), minhash(t, cfg.num_perm, cfg.shingle_size))
        for i, t in enumerate(texts)
    ]
    dropped = deduplicate(entries, cfg.jaccard_threshold, cfg.num_perm)

    def jaccard(k: int) -> float:
        a, b = shingles(texts[2 * k], 5), shingles(texts[2 * k + 1], 5)
        return len(a & b) / len(a | b)

    similar = [k for k in range(len(pairs)) if jaccard(k) >= 0.9]
    different = [k for k in range(len(pairs)) if jaccard(k) < 0.5]
    assert len(similar) > 10 and len(different) > 100

    def merged(k: int) -> bool:  # one of the two went, as a copy of the other or of a third
        return 2 * k in dropped or 2 * k + 1 in dropped

    assert sum(merged(k) for k in similar) >= 0.95 * len(similar)
    assert sum(merged(k) for k in different) == 0
