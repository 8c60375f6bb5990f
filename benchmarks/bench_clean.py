"""Throughput of the clean stage on real corpora, with 1 and with 2 worker processes.

    python benchmarks/bench_clean.py [--out runs/bench_clean] [--max-mb 6]

Builds one mixed corpus from ../shared/data (TinyStories prose with its mojibake, Song ci and
Tang poems, HH-RLHF dialogues), cleans it with the default config (no evaluation sets) once
per worker count, checks that both outputs are byte-identical, and appends the scaling table
to each run's DATA_CARD.md. Prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import load_config
from lmforge.stages import clean

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_documents(max_chars: int) -> Iterator[dict]:
    """Documents from each real corpus in turn, a quarter of `max_chars` each (prose gets
    the rest of what the others leave)."""
    share = max_chars // 4

    def capped(docs: Iterator[dict], limit: int) -> Iterator[dict]:
        total = 0
        for d in docs:
            if total >= limit:
                return
            total += len(d["text"])
            yield d

    def poems(path: Path, source: str) -> Iterator[dict]:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield {"text": "\n".join(json.loads(line)["paragraphs"]), "source": source}

    def dialogues() -> Iterator[dict]:
        for path in sorted((DATA / "hh_rlhf").glob("*/*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    pair = json.loads(line)
                    for key in ("chosen", "rejected"):
                        yield {"text": pair[key].strip(), "source": "hh_rlhf"}

    def stories() -> Iterator[dict]:
        with open(
            DATA / "tinystories_lowercased_prefix" / "tinystories.txt", encoding="utf-8"
        ) as f:
            for block in f.read().split("\n\n"):
                if block.strip():
                    yield {
                        "text": block.strip(),
                        "source": "tinystories",
                        "license": "CDLA-Sharing-1.0",
                    }

    poetry = DATA / "chinese_poetry"
    yield from capped(poems(poetry / "songci_all.jsonl", "chinese_poetry/songci"), share // 2)
    yield from capped(poems(poetry / "tang_poems_all.jsonl.gz", "chinese_poetry/tang"), share // 2)
    yield from capped(dialogues(), share)
    yield from capped(stories(), 2 * share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_clean"))
    parser.add_argument(
        "--max-mb", type=float, default=6.0, help="characters of input, in millions"
    )
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"shared data not found at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "real_corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in real_documents(int(args.max_mb * 1e6)):
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    rows = []
    for workers in (1, 2):
        cfg = load_config(
            None, [f"clean.inputs=['{corpus}']", "clean.eval_sets=[]", f"clean.workers={workers}"]
        )
        summary = clean.run(cfg, args.out / f"workers{workers}")
        rows.append((workers, summary))
    outputs = [(args.out / f"workers{w}" / "clean" / "corpus.jsonl").read_bytes() for w, _ in rows]
    base = rows[0][1]["mb_per_s"]
    table = (
        f"\n## Scaling on real corpora (benchmarks/bench_clean.py, {os.cpu_count()} CPU cores)\n\n"
        "| workers | documents in | MB in | seconds | MB/s | speed-up |\n|---|---|---|---|---|---|\n"
    )
    for workers, s in rows:
        table += (
            f"| {workers} | {s['docs_in']:,} | {s['mb_in']} | {s['seconds']} | {s['mb_per_s']} "
            f"| {s['mb_per_s'] / base:.2f}x |\n"
        )
    table += f"\nOutputs byte-identical: {'yes' if outputs[0] == outputs[1] else 'NO'}\n"
    for workers, _ in rows:
        with open(
            args.out / f"workers{workers}" / "clean" / "DATA_CARD.md", "a", encoding="utf-8"
        ) as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
