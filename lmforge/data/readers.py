"""Readers for JSON Lines (plain or gzip), JSON arrays, parquet, plain text and HTML pages.

Every reader streams (a JSON array excepted, which is one value): memory does not grow with
the size of the file. A .txt file is one document, or (`txt_mode="blocks"`) one document
per blank-line-separated block; an .html file is one document holding the page.

A malformed record is never silently dropped: it raises a DataError naming the file and
line, unless the caller asks to skip bad records, in which case every skip is counted.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file or record is unusable; the message names the file and line."""


@dataclass
class SkipReport:
    """Records skipped because they were malformed: (file:line, reason)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))


SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt", ".html", ".htm")


def corpus_files(path: str | Path) -> list[Path]:
    """A file, or every readable file under a directory in name order (a sharded corpus)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.name.lower().endswith(SUFFIXES))
    return [path]


def read_records(
    path: str | Path, skips: SkipReport | None = None, txt_mode: str = "file"
) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) with where = "file:line"; bad lines raise unless `skips` is given."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    if name.endswith(".json"):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for i, item in enumerate(items):
            yield from _checked(f"{path}:[{i}]", item, skips)
        return
    if name.endswith((".txt", ".html", ".htm")):
        yield from _read_text_file(path, txt_mode if name.endswith(".txt") else "file", skips)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    item = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    reason = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else e.msg
                    if skips is None:
                        raise DataError(f"{where}: not valid JSON ({reason})") from None
                    skips.add(where, f"not valid JSON ({reason})")
                    continue
                yield from _checked(where, item, skips)
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def _checked(where: str, item, skips: SkipReport | None) -> Iterator[tuple[str, dict]]:
    if isinstance(item, dict):
        yield where, item
    elif skips is None:
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    else:
        skips.add(where, f"expected a JSON object, got {type(item).__name__}")


def _read_text_file(path: Path, mode: str, skips: SkipReport | None) -> Iterator[tuple[str, dict]]:
    """The whole file as one document, or one document per blank-line-separated block
    (where = the block's first line), read line by line."""
    if mode not in ("file", "blocks"):
        raise ValueError(f"txt_mode must be 'file' or 'blocks', not {mode!r}")
    block: list[str] = []
    start = 1
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if skips is None:
                    raise DataError(f"{path}:{n}: not valid UTF-8") from None
                skips.add(f"{path}:{n}", "not valid UTF-8")
                continue
            if mode == "blocks" and not line.strip():
                if block:
                    yield f"{path}:{start}", {"text": "".join(block).strip("\n")}
                block = []
                continue
            if not block:
                start = n
            block.append(line)
    if block:
        text = "".join(block)
        yield f"{path}:{start}", {"text": text.strip("\n") if mode == "blocks" else text}


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow (pip install 'lmforge[parquet]')"
        ) from None
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1


def read_texts(
    path: str | Path, key: str = "text", skips: SkipReport | None = None
) -> Iterator[str]:
    """The `key` field of every record (the pretraining format), of a file or of every file
    of a sharded corpus directory."""
    for where, record in (item for f in corpus_files(path) for item in read_records(f, skips)):
        text = record.get(key)
        if isinstance(text, str):
            yield text
        elif skips is None:
            raise DataError(f"{where}: record needs a string field {key!r}")
        else:
            skips.add(where, f"record needs a string field {key!r}")
