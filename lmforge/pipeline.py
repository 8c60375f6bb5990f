"""Run the stages a config lists, in order, each writing DIR/<stage>/ for the next to read."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from lmforge.config import RunConfig, to_toml
from lmforge.stages import clean, dpo, grpo, kto, ppo, pretrain, rlaif, rm, sft, tokenizer, world
from lmforge.train_utils import console

STAGES: dict[str, Callable[..., dict]] = {
    "world": world.run,
    "clean": clean.run,
    "tokenizer": tokenizer.run,
    "pretrain": pretrain.run,
    "sft": sft.run,
    "rm": rm.run,
    "dpo": dpo.run,
    "kto": kto.run,
    "grpo": grpo.run,
    "ppo": ppo.run,
    "rlaif": rlaif.run,
}


def run_pipeline(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, dict]:
    """Run cfg.stages into run_dir; returns each stage's summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    summaries = {}
    for name in cfg.stages:
        console.rule(f"[bold]{name}")
        resumable = "resume" in inspect.signature(STAGES[name]).parameters
        options = {"resume": resume} if resumable else {}
        summaries[name] = STAGES[name](cfg, run_dir, **options)
    return summaries
