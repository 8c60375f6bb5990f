"""The run directory: where each stage writes, where it finds its inputs, what it records.

DIR/config.toml          the fully resolved config of the run
DIR/<stage>/config.toml  the same, as the stage saw it
DIR/<stage>/summary.json the stage's figures (flat, stable names) plus seconds and device
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, RunConfig, to_toml
from lmforge.io import write_json_atomic, write_text_atomic

# where the tokenizer and pretraining look for their corpus: the cleaned one first
CORPUS_CANDIDATES = ["clean/corpus", "world/corpus.jsonl"]


def stage_dir(run_dir: Path, stage: str, cfg: RunConfig) -> Path:
    """Create DIR/<stage>/ and record the resolved config in it (atomically: under torchrun
    every rank writes the same file)."""
    directory = Path(run_dir) / stage
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "config.toml", to_toml(cfg))
    return directory


def write_summary(directory: Path, summary: dict[str, Any]) -> dict[str, Any]:
    write_json_atomic(directory / "summary.json", summary)
    return summary


def find_input(run_dir: Path, explicit: str | None, key: str, candidates: list[str]) -> Path:
    """The path set by config key `key`, else the first candidate (relative to the run
    directory) that exists; the error names the key and every place looked at."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist")
        return path
    for candidate in candidates:
        path = Path(run_dir) / candidate
        if path.exists():
            return path
    looked = ", ".join(str(Path(run_dir) / c) for c in candidates)
    raise ConfigError(f"{key} is not set and no earlier stage wrote it (looked for {looked})")


def find_model_dir(run_dir: Path, explicit: str | None, key: str, stages: list[str]) -> Path:
    """The model directory set by config key `key`, else that of the first of the run's
    `stages` that wrote one (its model.safetensors)."""
    found = find_input(run_dir, explicit, key, [f"{s}/model.safetensors" for s in stages])
    return found.parent if found.is_file() else found


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
