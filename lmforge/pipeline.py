"""Run the stages a config lists, in order, each writing DIR/<stage>/ for the next to read.

Under torchrun, the stages that train data-parallel run on every rank; rank 0 alone makes
the world, cleans the corpus and trains the tokenizer, and every rank waits for the others
at the end of each stage, so that none reads a stage's output before it is written."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, RunConfig, to_toml
from lmforge.rollout import check_prompt_split
from lmforge.stages import clean, dpo, grpo, kto, ppo, pretrain, rlaif, rm, sft, tokenizer, world
from lmforge.train_utils import Dist, console, setup_device, wait_for_all_ranks, world_size

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


DATA_PARALLEL = frozenset({"pretrain", "sft", "rm", "dpo", "kto", "grpo", "ppo"})
ONE_PROCESS = frozenset({"world", "clean", "tokenizer"})  # rank 0's under torchrun


def run_pipeline(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, dict]:
    """Run cfg.stages into run_dir; returns each stage's summary (under torchrun, rank 0's;
    the other ranks return none)."""
    d = Dist()
    if world_size() > 1:
        alone = [name for name in cfg.stages if name not in DATA_PARALLEL | ONE_PROCESS]
        if alone:
            raise ConfigError(
                f"stages {alone} run in one process: under torchrun, leave them out of "
                "`stages` and run them afterwards with `lmforge <stage>`"
            )
        for name in {"grpo", "ppo"} & set(cfg.stages):
            check_prompt_split(name, getattr(cfg, name))
        d = setup_device(cfg.pretrain.device, cfg.pretrain.num_threads)
    run_dir = Path(run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    summaries = {}
    for name in cfg.stages:
        if d.is_main:
            console.rule(f"[bold]{name}")
        if name in DATA_PARALLEL or d.is_main:
            resumable = "resume" in inspect.signature(STAGES[name]).parameters
            options = {"resume": resume} if resumable else {}
            summary = STAGES[name](cfg, run_dir, **options)
            if d.is_main:
                summaries[name] = summary
        wait_for_all_ranks(d)
    return summaries
