"""Writing the world to disk: one JSON Lines file per registered generator, plus facts.json.

`STAGE_FILES` is the registry of what the world stage writes. Each entry maps a file name to
a generator `(world, cfg) -> list[dict]`; `write_world` writes every registered file. Today it
holds the pretraining corpus, the held-out text, the evaluation sets, the SFT conversations
with their evaluation sets (`sft.py`), the ranked comparison data (`preferences.py`) and the
word problems with verifiable answers for online RL (`rl_train.jsonl`). Each file is written
atomically, with its count in the summary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lmforge.config import WorldConfig
from lmforge.io import write_jsonl_atomic, write_text_atomic

from .arithmetic import eval_arithmetic
from .corpus import heldout_documents, pretraining_documents
from .entities import World, build_world
from .noise import AD_PHRASES, NOISE_KINDS
from .preferences import pair_agreement, pref_eval, pref_train
from .probes import fact_probes
from .sft import (
    rl_train,
    sft_conversations,
    sft_eval_arithmetic,
    sft_eval_facts,
    sft_eval_safety,
)
from .templates import capital_sentence

Generator = Callable[[World, WorldConfig], list[dict]]

STAGE_FILES: dict[str, Generator] = {
    "corpus.jsonl": pretraining_documents,
    "heldout.jsonl": heldout_documents,
    "probes.jsonl": lambda world, cfg: fact_probes(world, cfg.languages),
    "eval_arithmetic.jsonl": eval_arithmetic,
    "unwanted_phrases.jsonl": lambda world, cfg: [
        {"phrase": p, "lang": lang, "kind": "ad"}
        for lang in cfg.languages
        for p in AD_PHRASES[lang]
    ],
    "sft_train.jsonl": sft_conversations,
    "sft_eval_facts.jsonl": sft_eval_facts,
    "sft_eval_arithmetic.jsonl": sft_eval_arithmetic,
    "sft_eval_safety.jsonl": sft_eval_safety,
    "pref_train.jsonl": pref_train,
    "pref_eval.jsonl": pref_eval,
    "rl_train.jsonl": rl_train,
}


def corpus_stats(docs: list[dict], world: World, languages: list[str]) -> dict:
    """Flat counts for the summary: documents per noise kind and per clean source, and how
    often each canonical capital sentence occurs in clean text (min and mean per language)."""
    stats: dict = {"n_documents": len(docs), "n_chars": sum(len(d["text"]) for d in docs)}
    noise = Counter(d["noise"] or "clean" for d in docs)
    stats["n_clean"] = noise.pop("clean", 0)
    stats["n_noise"] = sum(noise.values())
    for kind in NOISE_KINDS:
        stats[f"noise_{kind}"] = noise[kind]
    sources = Counter(d["source"].removeprefix("world/") for d in docs if d["noise"] is None)
    for source, n in sorted(sources.items()):
        stats[f"clean_{source}"] = n
    for lang in languages:
        clean = "\n".join(d["text"] for d in docs if d["noise"] is None and d["lang"] == lang)
        stats[f"n_chars_clean_{lang}"] = len(clean)
        counts = [clean.count(capital_sentence(c, lang)) for c in world.countries]
        if counts:
            stats[f"capital_canonical_min_{lang}"] = min(counts)
            stats[f"capital_canonical_mean_{lang}"] = round(sum(counts) / len(counts), 1)
    return stats


def write_world(cfg: WorldConfig, out_dir: Path) -> dict:
    """Generate the world for `cfg` into `out_dir`: every file in `STAGE_FILES` plus
    `facts.json` (the truth), each written atomically.

    Returns a flat summary: `n_countries`, `n_people`, `n_documents`, `n_chars`, `n_clean`,
    `n_noise`, `noise_<kind>` for every kind, `clean_<source>` per clean source,
    `n_chars_clean_<lang>`, `capital_canonical_min_<lang>` / `_mean_<lang>` (occurrences of
    each canonical capital sentence), `n_<file>` for every other registered file (`n_heldout`,
    `n_probes`, `n_eval_arithmetic`, `n_sft_train`, `n_sft_eval_facts`, ...) and `n_sft_heldout_countries`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    write_text_atomic(
        out_dir / "facts.json", json.dumps(world.to_dict(), ensure_ascii=False, indent=1) + "\n"
    )
    summary: dict = {"n_countries": len(world.countries), "n_people": len(world.people)}
    for name, generate in STAGE_FILES.items():
        records = generate(world, cfg)
        write_jsonl_atomic(out_dir / name, records)
        if name == "corpus.jsonl":
            summary.update(corpus_stats(records, world, list(cfg.languages)))
        else:
            summary[f"n_{name.split('.')[0]}"] = len(records)
        if name == "pref_eval.jsonl" and records:  # what the annotators' noise came to
            agreement = pair_agreement(
                [r["ranking"] for r in records], [r["ranking_b"] for r in records]
            )
            summary["pref_annotator_agreement"] = round(agreement, 4)
    summary["n_sft_heldout_countries"] = sum(c.sft_heldout for c in world.countries)
    return summary
