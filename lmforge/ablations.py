"""Ablations: one command runs a stage under several settings and tabulates what changed.

    lmforge ablate sft-init --out runs/default      # after `lmforge run` has made runs/default

Every variant is the same stage with a few overrides on top of the run's config, trained
from the same base model and data into DIR/ablations/<name>/<variant>/, so the only
difference between the columns is the setting the ablation asks about. The table (rows =
figures, columns = variants) goes to DIR/ablations/<name>.md and the figures to
DIR/ablations/<name>.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import RunConfig, load_config
from lmforge.eval.compare import markdown_table
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.stages import sft

CHAT_FIGURES = [
    "heldout_fact_accuracy",
    "seen_fact_accuracy",
    "end_token_rate",
    "refusal_rate",
    "over_refusal_rate",
    "arith_accuracy",
]


@dataclass(frozen=True)
class Ablation:
    question: str
    run: Callable[..., dict]  # a stage's run(cfg, run_dir, stage=...)
    variants: dict[str, list[str]]  # label -> overrides
    figures: list[str]


ABLATIONS: dict[str, Ablation] = {
    "sft-init": Ablation(
        "What does pretraining contribute? SFT from the pretrained model vs from random weights",
        sft.run,
        {"pretrained": ["sft.init=pretrained"], "random init": ["sft.init=random"]},
        [*CHAT_FIGURES, "val_loss", "seconds"],
    ),
    "sft-replay": Ablation(
        "Does replaying pretraining text limit forgetting? SFT without and with replay",
        sft.run,
        {"no replay": ["sft.replay_fraction=0"], "replay 50%": ["sft.replay_fraction=0.5"]},
        ["lm_loss_before", "lm_loss_after", *CHAT_FIGURES, "seconds"],
    ),
    "sft-lora": Ablation(
        "How close does LoRA (rank 8) get to full fine-tuning?",
        sft.run,
        {
            "full": ["sft.method=full"],
            # every projection, and a learning rate 3x full fine-tuning's (adapters start at
            # zero and move slower)
            "LoRA rank 8": [
                "sft.method=lora",
                "sft.lora.rank=8",
                "sft.lora.target_modules=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']",
                "sft.lr=3e-3",
            ],
        },
        [*CHAT_FIGURES, "trainable_parameters", "trainable_fraction", "seconds"],
    ),
}


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_ablation(
    name: str, run_dir: Path, config: Path | None = None, overrides: list[str] | None = None
) -> dict[str, dict]:
    """Run every variant of ablation `name` in run_dir; returns label -> summary."""
    ablation = ABLATIONS[name]
    run_dir = Path(run_dir)
    if config is None and (run_dir / "config.toml").exists():
        config = run_dir / "config.toml"  # the run's own settings, not the built-in defaults
    results = {}
    for label, variant in ablation.variants.items():
        cfg: RunConfig = load_config(config, [*(overrides or []), *variant])
        stage = f"ablations/{name}/{_slug(label)}"
        results[label] = ablation.run(cfg, run_dir, stage=stage)
    table = {label: {k: s.get(k) for k in ablation.figures} for label, s in results.items()}
    out = run_dir / "ablations"
    write_json_atomic(out / f"{name}.json", {"question": ablation.question, "figures": table})
    text = f"# {name}\n\n{ablation.question}\n\n" + markdown_table(table, ablation.figures)
    write_text_atomic(out / f"{name}.md", text)
    return results
