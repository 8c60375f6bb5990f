"""Stage `world`: generate the built-in synthetic world (WORLD.md) into DIR/world/."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import RunConfig
from lmforge.runs import Timer, stage_dir, write_summary
from lmforge.world import write_world


def run(cfg: RunConfig, run_dir: Path) -> dict:
    timer = Timer()
    out = stage_dir(run_dir, "world", cfg)
    summary = write_world(cfg.world, out)
    return write_summary(out, {**summary, "seconds": timer.seconds, "device": "cpu"})
