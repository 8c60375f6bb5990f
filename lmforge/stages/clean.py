"""Stage `clean`: raw documents in, a cleaned corpus and its data card out.

    inputs ─read─▶ filters + decontamination (clean.workers processes) ─▶ exact and near
    dedup ─▶ boilerplate paragraphs ─▶ mixing ─▶ DIR/clean/corpus/part-*.jsonl, DATA_CARD.md, summary.json

Pass 1 streams the inputs through the per-document filters (`data/filters.py`) and the
decontamination check (`data/decontam.py`) in worker processes, in order, and spills the
survivors to a temporary file; only their hashes and MinHash signatures stay in memory.
Deduplication (`data/dedup.py`) then decides which copies go, and pass 2 reads the spill back
to drop boilerplate paragraphs and write each source as many times as its mixing weight
says (`data/mixing.py`). The same input gives byte-identical output for any number of workers.

When the input is the built-in world, its hidden `noise` label is removed from every record
before cleaning and used only afterwards, to score each filter: `recall_<kind>` and
`false_drop_rate` in the summary and the data card.
"""

from __future__ import annotations

import html
import json
import multiprocessing
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmforge.config import CleanConfig, RunConfig
from lmforge.data.decontam import EvalItem, NgramIndex, decontaminate, load_eval_items
from lmforge.data.dedup import (
    Entry,
    deduplicate,
    exact_key,
    minhash,
    repeated_paragraphs,
    strip_paragraphs,
)
from lmforge.data.filters import apply_filters, build_filters
from lmforge.data.mixing import copies, weight_for
from lmforge.data.readers import DataError, SkipReport, corpus_files, read_records
from lmforge.data.shards import prepare_shards
from lmforge.data.text import cjk_fraction, stable_hash
from lmforge.io import JsonlShards, write_text_atomic
from lmforge.runs import Timer, find_input, stage_dir, write_summary
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import console
from lmforge.world.noise import NOISE_KINDS, unmojibake

WORLD_CORPUS = "world/corpus.jsonl"
WORLD_EVAL = "world/eval_arithmetic.jsonl"
LABEL = "noise"  # the world's hidden noise label: for scoring only


# ---- pass 1: one document through the filters (runs in worker processes) ----------------------
@dataclass
class Outcome:
    """What pass 1 found out about one document."""

    index: int
    where: str
    doc: dict | None  # the cleaned document, None when dropped
    reason: str | None  # why it was dropped
    changed: list[str]  # the filters that changed its text
    hits: set[int]  # evaluation items found in it
    key: bytes | None = None
    signature: np.ndarray | None = None
    sample: str = ""  # the start of a dropped document's text, for the data card


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: CleanConfig, items: list[EvalItem]) -> None:
    """Build the filters and the evaluation n-gram index once per process."""
    _WORKER["cfg"] = cfg
    _WORKER["filters"] = build_filters(cfg)
    _WORKER["index"] = (
        NgramIndex(items, cfg.decontam_ngram, cfg.decontam_max_items, cfg.decontam_min_coverage)
        if items
        else None
    )


def clean_document(index: int, where: str, doc: dict) -> Outcome:
    """Filters, then decontamination, then the keys deduplication needs."""
    cfg: CleanConfig = _WORKER["cfg"]
    out, changed = apply_filters(doc, _WORKER["filters"])
    hits: set[int] = set()
    if not isinstance(out, str) and _WORKER["index"] is not None:
        hits, lines = _WORKER["index"].matches(out["text"])
        redacted = decontaminate(out, lines, cfg.decontam_mode)
        if not isinstance(redacted, str) and redacted["text"] != out["text"]:
            changed.append("decontam")
        out = redacted
    if isinstance(out, str):
        return Outcome(index, where, None, out, changed, hits, sample=doc["text"][:300])
    text = out["text"]
    size = cfg.cjk_shingle_size if cjk_fraction(text) >= 0.3 else cfg.shingle_size
    signature = minhash(text, cfg.num_perm, size) if cfg.near_dedup else None
    key = exact_key(text) if cfg.exact_dedup else index.to_bytes(8, "big")
    return Outcome(index, where, out, None, changed, hits, key, signature)


def _clean_chunk(chunk: list[tuple[int, str, dict]]) -> list[Outcome]:
    return [clean_document(*item) for item in chunk]


def _outcomes(
    chunks: Iterable[list[tuple[int, str, dict]]], cfg: CleanConfig, items: list[EvalItem]
) -> Iterator[Outcome]:
    """Outcomes in input order, from `cfg.workers` processes with a bounded queue (so
    memory does not grow with the corpus)."""
    if cfg.workers == 1:
        _init_worker(cfg, items)
        for chunk in chunks:
            yield from _clean_chunk(chunk)
        return
    # fork: the workers inherit the loaded modules instead of importing them again
    with multiprocessing.get_context("fork").Pool(cfg.workers, _init_worker, (cfg, items)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_clean_chunk, (chunk,)))
            if len(pending) >= 2 * cfg.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---- inputs ------------------------------------------------------------------------------------
def input_files(cfg: CleanConfig, run_dir: Path) -> list[Path]:
    """The files to clean: `clean.inputs` (files, or directories searched for readable
    files, in name order), else this run's world corpus."""
    if not cfg.inputs:
        return [find_input(run_dir, None, "clean.inputs", [WORLD_CORPUS])]
    files: list[Path] = []
    for entry in cfg.inputs:
        files += corpus_files(find_input(run_dir, entry, "clean.inputs", []))
    return files


def eval_specs(cfg: CleanConfig, run_dir: Path) -> list[str]:
    """`clean.eval_sets`, else this run's world evaluation questions when they exist."""
    if cfg.eval_sets is not None:
        return cfg.eval_sets
    world_eval = Path(run_dir) / WORLD_EVAL
    return [f"{world_eval}:question"] if world_eval.exists() else []


# ---- scoring against the world's labels --------------------------------------------------------
_PARAGRAPH = re.compile(r"<p>(.*?)</p>", re.DOTALL)
# what the world's web pages wrap around their text (world/noise.py: html_page)
_BOILERPLATE = ("Log in", "Privacy policy", "Cookie settings", "Random page", "gtag(", "<")


def expected_repair(kind: str, raw: str) -> Any:
    """For the kinds repaired rather than dropped: what the cleaned text must contain."""
    if kind == "html":
        return [html.unescape(p) for p in _PARAGRAPH.findall(raw)]
    return unmojibake(raw)


def is_repaired(kind: str, expected: Any, text: str) -> bool:
    """html: every paragraph kept, no boilerplate left; mojibake: the text restored exactly."""
    if kind == "html":
        return all(p in text for p in expected) and not any(b in text for b in _BOILERPLATE)
    return text == expected


# ---- the stage ---------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Everything counted on the way, for the summary and the data card."""

    docs_in: int = 0
    bytes_in: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> documents
    changed: Counter = field(default_factory=Counter)  # filter -> documents it repaired
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [(where, text)]
    licenses_in: Counter = field(default_factory=Counter)
    licenses_out: Counter = field(default_factory=Counter)
    reasons: dict = field(default_factory=dict)  # index -> reason, for every dropped document
    duplicate_of: dict = field(default_factory=dict)  # index -> the index of the copy kept
    found: dict = field(default_factory=dict)  # eval item -> where it was first found
    labels: dict = field(default_factory=dict)  # index -> noise kind (None: clean)
    expected: dict = field(default_factory=dict)  # index -> expected repair
    repaired: set = field(default_factory=set)  # indices of html/mojibake documents repaired
    sources: dict = field(default_factory=dict)  # source -> [documents kept, copies written]

    def drop(self, index: int, where: str, reason: str, text: str, limit: int) -> None:
        self.reasons[index] = reason
        self.dropped[reason] += 1
        if len(self.examples[reason]) < limit:
            self.examples[reason].append((where, text[:300]))


def _read(
    files: list[Path], cfg: CleanConfig, skips: SkipReport | None
) -> Iterator[tuple[str, dict]]:
    for path in files:
        for where, record in read_records(path, skips, cfg.txt_mode):
            if isinstance(record.get("text"), str):
                yield where, record
            elif skips is None:
                raise DataError(f"{where}: record needs a string field 'text'")
            else:
                skips.add(where, "record needs a string field 'text'")


def run(cfg: RunConfig, run_dir: Path) -> dict:
    timer = Timer()
    cc = cfg.clean
    run_dir = Path(run_dir)
    files = input_files(cc, run_dir)
    items = load_eval_items(eval_specs(cc, run_dir))
    tokenizer = (
        Tokenizer.from_file(find_input(run_dir, cc.tokenizer, "clean.tokenizer", []))
        if cc.tokenizer
        else None
    )
    out = stage_dir(run_dir, "clean", cfg)
    skips = SkipReport() if cc.skip_bad else None
    ledger = Ledger()
    spill_path = out / f".spill{id(ledger)}.jsonl"
    try:
        entries, offsets, first_copy = _pass1(files, cc, items, skips, ledger, spill_path)
        with open(spill_path, "rb") as spill:
            summary = _pass2(cc, cfg.seed, entries, offsets, first_copy, ledger, spill, out)
    finally:
        spill_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - timer.start
    summary.update(
        docs_in=ledger.docs_in,
        mb_in=round(ledger.bytes_in / 1e6, 3),
        mb_per_s=round(ledger.bytes_in / 1e6 / max(seconds, 1e-9), 3),
        skipped_bad=len(skips.skipped) if skips else 0,
        eval_items=len(items),
        eval_items_found=len(ledger.found),
        workers=cc.workers,
    )
    if tokenizer is not None:  # token shards that pretraining on this corpus picks up
        meta = prepare_shards(out / "corpus", tokenizer, out / "tokens", cfg.pretrain.val_fraction)
        summary.update(train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"])
    summary.update(_score(ledger))
    card = data_card(cc, files, items, ledger, summary, skips, seconds)
    write_text_atomic(out / "DATA_CARD.md", card)
    console.print(
        f"clean: {summary['docs_in']} documents in, {summary['docs_out']} out, "
        f"{summary['mb_per_s']} MB/s; see {out / 'DATA_CARD.md'}"
    )
    return write_summary(
        out, {**summary, "seconds": round(seconds, 2), "device": f"cpu x {cc.workers}"}
    )


def _pass1(
    files: list[Path],
    cc: CleanConfig,
    items: list[EvalItem],
    skips: SkipReport | None,
    ledger: Ledger,
    spill_path: Path,
) -> tuple[list[Entry], dict[int, int], dict[int, int]]:
    """Filter every document; spill the survivors. Returns their dedup entries, their
    offsets in the spill, and {index: earlier index} for documents that repeat an earlier
    one exactly (text and licence): those are not filtered again, they share its fate."""
    seen: dict[int, int] = {}
    first_copy: dict[int, int] = {}

    def chunks() -> Iterator[list[tuple[int, str, dict]]]:
        chunk: list[tuple[int, str, dict]] = []
        for index, (where, record) in enumerate(_read(files, cc, skips)):
            ledger.docs_in += 1
            ledger.bytes_in += len(record["text"].encode("utf-8"))
            ledger.licenses_in[str(record.get("license") or "(none)")] += 1
            if LABEL in record:  # taken off before any filter sees the record
                label = ledger.labels[index] = record.pop(LABEL)
                if label in ("html", "mojibake"):
                    ledger.expected[index] = expected_repair(label, record["text"])
            if cc.exact_dedup:
                h = stable_hash(f"{record.get('license')}\x00{record['text']}")
                if h in seen:
                    first_copy[index] = seen[h]
                    continue
                seen[h] = index
            chunk.append((index, where, record))
            if len(chunk) >= cc.chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    entries: list[Entry] = []
    offsets: dict[int, int] = {}
    with open(spill_path, "wb") as spill:
        for o in _outcomes(chunks(), cc, items):
            ledger.changed.update(o.changed)
            for k in o.hits:
                ledger.found.setdefault(k, o.where)
            if o.doc is None:
                ledger.drop(o.index, o.where, o.reason, o.sample, cc.examples)
                continue
            offsets[o.index] = spill.tell()
            line = json.dumps({"where": o.where, "doc": o.doc}, ensure_ascii=False)
            spill.write(line.encode("utf-8") + b"\n")
            entries.append(Entry(o.index, len(o.doc["text"]), o.key, o.signature))
    return entries, offsets, first_copy


def _pass2(
    cc: CleanConfig,
    seed: int,
    entries: list[Entry],
    offsets: dict[int, int],
    first_copy: dict[int, int],
    ledger: Ledger,
    spill: BinaryIO,
    out: Path,
) -> dict:
    """Deduplicate, strip boilerplate paragraphs, mix (seeded), and write the corpus."""

    def load(index: int) -> tuple[str, dict]:
        spill.seek(offsets[index])
        item = json.loads(spill.readline())
        return item["where"], item["doc"]

    duplicates = (
        deduplicate(
            entries,
            cc.jaccard_threshold,
            cc.num_perm,
            cc.min_containment,
            lambda i: load(i)[1]["text"],
        )
        if cc.exact_dedup or cc.near_dedup
        else {}
    )
    for index, (reason, kept) in sorted(duplicates.items()):
        where, doc = load(index)
        ledger.drop(index, where, reason, doc["text"], cc.examples)
        ledger.duplicate_of[index] = kept
    # exact repeats share the fate of their first copy
    for index, first in first_copy.items():
        reason = ledger.reasons.get(first)
        if reason is None or reason.startswith("dedup:"):
            ledger.duplicate_of[index] = ledger.duplicate_of.get(first, first)
            reason = "dedup:exact"
        ledger.drop(index, "", reason, "", 0)

    survivors = [
        e.index for e in sorted(entries, key=lambda e: e.index) if e.index not in duplicates
    ]
    boilerplate: Counter = Counter()
    if cc.boilerplate_min_docs > 0:
        texts = (load(i)[1]["text"] for i in survivors)
        boilerplate = repeated_paragraphs(texts, cc.boilerplate_min_docs, cc.boilerplate_min_chars)

    kept: list[tuple[int, int]] = []  # (index, copies)
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # source -> [docs, copies]
    bytes_out = 0
    for index in survivors:
        where, doc = load(index)
        if boilerplate:
            text = strip_paragraphs(doc["text"], boilerplate)
            if not text:
                ledger.drop(index, where, "boilerplate:empty", doc["text"], cc.examples)
                continue
            if text != doc["text"]:
                ledger.changed["boilerplate"] += 1
        source = str(doc.get("source") or "(none)")
        n = copies(weight_for(source, cc.mix), doc["text"], seed)
        per_source[source][0] += 1
        per_source[source][1] += n
        ledger.licenses_out[str(doc.get("license") or "(none)")] += 1
        if index in ledger.expected and is_repaired(
            ledger.labels[index], ledger.expected[index], doc["text"]
        ):
            ledger.repaired.add(index)
        kept.append((index, n))
    docs_out = 0
    with JsonlShards(out / "corpus", cc.shard_mb) as shards:
        for epoch_pass in range(max((n for _, n in kept), default=0)):
            for index, n in kept:
                if n > epoch_pass:
                    _, doc = load(index)
                    if boilerplate:
                        doc["text"] = strip_paragraphs(doc["text"], boilerplate)
                    bytes_out += shards.write(json.dumps(doc, ensure_ascii=False) + "\n")
                    docs_out += 1
    summary: dict[str, Any] = {
        "docs_kept": len(kept),
        "docs_out": docs_out,
        "mb_out": round(bytes_out / 1e6, 3),
    }
    for reason, n in sorted(ledger.dropped.items()):
        summary[f"dropped_{reason.replace(':', '_')}"] = n
    for name, n in sorted(ledger.changed.items()):
        summary[f"repaired_{name}"] = n
    summary["boilerplate_paragraphs"] = len(boilerplate)
    ledger.sources.update(per_source)
    return summary


def _score(ledger: Ledger) -> dict:
    """Recall of the cleaning on each labelled noise kind, and the share of clean documents
    dropped. A kind repaired rather than dropped (html, mojibake) counts as caught when its
    document is kept and repaired. A duplicate kind (ad, near_duplicate) counts as caught
    when its copies collapsed to one, whichever copy was kept: the copy the world calls the
    original differs from the others only by the edit; `recall_<kind>_strict` counts only
    the labelled copies that were dropped themselves."""
    if not ledger.labels:
        return {}
    total = Counter(ledger.labels.values())
    kept_copies = set(ledger.duplicate_of.values())
    caught: Counter = Counter()
    strict: Counter = Counter()
    for index, kind in ledger.labels.items():
        dropped = index in ledger.reasons
        if kind in ("html", "mojibake"):
            dropped = index in ledger.repaired
        strict[kind] += dropped
        caught[kind] += dropped or (kind in ("ad", "near_duplicate") and index in kept_copies)
    summary: dict[str, Any] = {}
    for kind in NOISE_KINDS:
        if total[kind]:
            summary[f"recall_{kind}"] = round(caught[kind] / total[kind], 4)
    for kind in ("ad", "near_duplicate"):
        if total[kind]:
            summary[f"recall_{kind}_strict"] = round(strict[kind] / total[kind], 4)
    if total[None]:
        summary["clean_docs"] = total[None]
        summary["false_drops"] = strict[None]
        summary["false_drop_rate"] = round(strict[None] / total[None], 4)
    return summary


def _table(header: tuple[str, ...], rows: Iterable[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _quote(text: str, limit: int = 200) -> str:
    text = text.replace("\n", " ⏎ ").replace("|", "\\|")
    return f"`{text[:limit]}`" + ("…" if len(text) > limit else "")


def data_card(
    cc: CleanConfig,
    files: list[Path],
    items: list[EvalItem],
    ledger: Ledger,
    summary: dict,
    skips: SkipReport | None,
    seconds: float,
) -> str:
    """DATA_CARD.md: what went in, what came out, and why each dropped document went."""
    s = summary
    parts = [
        "# Data card: cleaned corpus\n\n",
        f"Inputs: {', '.join(str(f) for f in files)}  \n"
        f"Output: corpus/ ({cc.shard_mb:g} MB JSONL shards), {s['docs_out']:,} documents ({s['docs_kept']:,} distinct, the "
        f"rest copies made by the mixing weights), {s['mb_out']} MB\n\n",
        "## Throughput\n\n",
        _table(
            ("documents in", "MB in", "seconds", "MB/s", "workers"),
            [(f"{s['docs_in']:,}", s["mb_in"], round(seconds, 2), s["mb_per_s"], cc.workers)],
        ),
        "\n## Kept and dropped, per filter and reason\n\n",
        _table(
            ("filter:reason", "documents", "share of input"),
            [
                (r, f"{n:,}", f"{n / max(1, s['docs_in']):.2%}")
                for r, n in sorted(ledger.dropped.items(), key=lambda x: -x[1])
            ]
            + [("kept", f"{s['docs_kept']:,}", f"{s['docs_kept'] / max(1, s['docs_in']):.2%}")],
        ),
        "\nRepaired (text changed, document kept): "
        + (", ".join(f"{k} {v:,}" for k, v in sorted(ledger.changed.items())) or "none")
        + f". Boilerplate paragraphs (in >= {cc.boilerplate_min_docs} documents): "
        f"{s['boilerplate_paragraphs']}.\n",
    ]
    if skips is not None:
        parts.append(f"\nMalformed records skipped (`clean.skip_bad`): {len(skips.skipped)}\n\n")
        parts += [f"- {w}: {r}\n" for w, r in skips.skipped[:20]]
    if "false_drop_rate" in s:
        rows = [(k.removeprefix("recall_"), s[k]) for k in s if k.startswith("recall_")]
        parts += [
            "\n## Scored against the world's noise labels\n\n",
            "Recall: the share of each planted kind removed (html, mojibake: repaired; "
            "duplicates: collapsed to one copy, `_strict`: the labelled copy itself dropped).\n\n",
            _table(("noise kind", "recall"), rows),
            f"\nClean documents wrongly dropped: {s['false_drops']} of {s['clean_docs']:,} "
            f"(false_drop_rate {s['false_drop_rate']:.2%}); by reason: "
            + ", ".join(
                f"{r} {n}"
                for r, n in Counter(
                    ledger.reasons[i]
                    for i, k in ledger.labels.items()
                    if k is None and i in ledger.reasons
                ).most_common()
            )
            + "\n",
        ]
    parts.append("\n## Examples of dropped documents\n\n")
    for reason, examples in sorted(ledger.examples.items()):
        for where, text in examples:
            parts.append(f"- **{reason}** ({where}): {_quote(text)}\n")
    parts.append("\n## Licences\n\n")
    parts.append(
        _table(
            ("licence", "documents in", "kept"),
            [
                (k, f"{n:,}", f"{ledger.licenses_out[k]:,}")
                for k, n in ledger.licenses_in.most_common()
            ],
        )
    )
    clusters = Counter(ledger.duplicate_of.values())
    parts.append(f"\n## Duplicate clusters ({len(clusters):,}; largest first)\n\n")
    rows = []
    for kept, n in clusters.most_common(10):
        members = [i for i, k in ledger.duplicate_of.items() if k == kept]
        kinds = Counter(ledger.reasons[i] for i in members)
        rows.append((kept, n + 1, ", ".join(f"{r} {c}" for r, c in kinds.items())))
    parts.append(_table(("document kept (input position)", "copies", "dropped as"), rows))
    eval_sets = ", ".join(sorted({item.source for item in items})) or "none"
    parts.append(
        f"\n## Decontamination\n\n{len(items)} evaluation items ({eval_sets}); "
        f"{len(ledger.found)} found in the corpus ({cc.decontam_ngram}-grams, coverage >= "
        f"{cc.decontam_min_coverage}; mode {cc.decontam_mode}).\n\n"
    )
    for k in sorted(ledger.found)[:30]:
        parts.append(
            f"- {items[k].source} item {items[k].index}: {_quote(items[k].text, 120)} (in {ledger.found[k]})\n"
        )
    if len(ledger.found) > 30:
        parts.append(f"- ... and {len(ledger.found) - 30} more\n")
    parts.append("\n## Mixing: epochs per source\n\n")
    parts.append(
        _table(
            ("source", "weight", "documents", "copies written", "epochs"),
            [
                (src, weight_for(src, cc.mix), f"{d:,}", f"{c:,}", round(c / max(1, d), 3))
                for src, (d, c) in sorted(ledger.sources.items())
            ],
        )
    )
    return "".join(parts)
