"""Stage `tokenizer`: train byte-level BPE on the corpus; report compression on held-out text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.data.readers import read_records, read_texts
from lmforge.runs import CORPUS_CANDIDATES, Timer, find_input, stage_dir, write_summary
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train_utils import console

HAN = re.compile(r"[\u4e00-\u9fff]")


def _limited(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return


def compression(tokenizer: Tokenizer, texts: list[str]) -> float:
    """Characters per token over `texts` (higher is better)."""
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return round(sum(len(t) for t in texts) / max(1, n_tokens), 4)


def run(cfg: RunConfig, run_dir: Path) -> dict:
    timer = Timer()
    tc = cfg.tokenizer
    corpus = find_input(run_dir, tc.corpus, "tokenizer.corpus", CORPUS_CANDIDATES)
    out = stage_dir(run_dir, "tokenizer", cfg)
    tokenizer = train_tokenizer(
        _limited(read_texts(corpus), tc.max_train_chars), tc.vocab_size, tc.min_frequency
    )
    tokenizer.save(out / "tokenizer.json")
    summary = {"vocab_size": tokenizer.vocab_size, "corpus": str(corpus)}
    heldout = Path(run_dir) / "world" / "heldout.jsonl"
    if heldout.exists():
        records = [r for _, r in read_records(heldout)]
        zh = [r["text"] for r in records if HAN.search(r["text"])]
        en = [r["text"] for r in records if not HAN.search(r["text"])]
        summary["chars_per_token"] = compression(tokenizer, en + zh)
        if en:
            summary["chars_per_token_en"] = compression(tokenizer, en)
        if zh:
            summary["chars_per_token_zh"] = compression(tokenizer, zh)
        console.print(f"tokenizer: {tokenizer.vocab_size} tokens; held-out chars/token {summary}")
    return write_summary(out, {**summary, "seconds": timer.seconds, "device": "cpu"})
