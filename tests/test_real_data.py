"""The tokenizer and the readers on real text from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.data.readers import read_records, read_texts
from lmforge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


@needs_data
def test_round_trip_on_real_prose_poetry_and_mojibake(tokenizer):
    stories = (DATA / "tinystories_lowercased_prefix" / "tinystories.txt").read_text("utf-8")
    songci = [json.loads(line) for line in (DATA / "chinese_poetry" / "songci_all.jsonl").open()][
        :300
    ]
    with gzip.open(
        DATA / "chinese_poetry" / "tang_poems_all.jsonl.gz", "rt", encoding="utf-8"
    ) as f:
        tang = [json.loads(next(f)) for _ in range(300)]  # traditional characters
    texts = [stories[i : i + 2000] for i in range(0, 200_000, 2000)]
    texts += ["".join(r["paragraphs"]) for r in songci + tang]
    # a tokenizer that never saw this text still reproduces every character of it
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    raw = (DATA / "tinystories_lowercased_prefix" / "tinystories.txt").read_bytes()[:50_000]
    assert tokenizer.decode_bytes(tokenizer.encode_bytes(raw)) == raw


@needs_data
def test_trained_on_real_text_compresses_it():
    stories = (DATA / "tinystories_lowercased_prefix" / "tinystories.txt").read_text("utf-8")
    train, held_out = stories[:1_000_000], stories[1_000_000:1_100_000]
    tok = train_tokenizer([train[i : i + 4000] for i in range(0, len(train), 4000)], 2048)
    chars_per_token = len(held_out) / len(tok.encode(held_out))
    assert chars_per_token > 3.0  # English prose: well above bytes (1.0)
    assert tok.decode(tok.encode(held_out)) == held_out


@needs_data
def test_readers_on_real_files():
    gsm = list(read_records(DATA / "gsm8k" / "test.jsonl"))
    assert len(gsm) == 1319 and "####" in gsm[0][1]["answer"]
    assert gsm[5][0].endswith("test.jsonl:6")
    alpaca = list(read_records(DATA / "sft_alpaca_demo_noncommercial" / "alpaca_zh_demo.json"))
    assert len(alpaca) == 1000 and {"instruction", "output"} <= alpaca[0][1].keys()
    hh = next((DATA / "hh_rlhf" / "helpful-base").glob("*.jsonl.gz"))
    first = next(iter(read_records(hh)))[1]
    assert {"chosen", "rejected"} <= first.keys()
    with pytest.raises(ValueError, match="string field 'text'"):
        next(read_texts(DATA / "gsm8k" / "test.jsonl"))
