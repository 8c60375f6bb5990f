"""Several models side by side in chat format (`lmforge eval`): the base model and its SFT, or
two fine-tuning settings, scored by `chat.chat_eval` on the same held-out sets of one world, so
each row of the table compares like with like.

    models = run_models(Path("runs/default"))       # {"base": .../pretrain, "sft": .../sft}
    results = compare(models, Path("runs/default/world"))
    print(markdown_table(results))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.table import Table

from lmforge.data.readers import DataError
from lmforge.eval.chat import EVAL_FILES, FIGURES, chat_eval
from lmforge.io import CheckpointError, load_model_dir, write_json_atomic, write_text_atomic

# the model directories of a run, by the label the table gives them
RUN_MODELS = {"base": "pretrain", "sft": "sft"}


def is_model_dir(path: Path) -> bool:
    return (path / "model.json").is_file()


def run_models(run_dir: Path) -> dict[str, Path]:
    """The finished models of a run: DIR/pretrain as "base", DIR/sft as "sft" (those whose
    model directory exists; a stage still training has none yet)."""
    found = {label: run_dir / name for label, name in RUN_MODELS.items()}
    found = {label: path for label, path in found.items() if is_model_dir(path)}
    if not found:
        looked = ", ".join(str(run_dir / name) for name in RUN_MODELS.values())
        raise CheckpointError(f"{run_dir}: no model directory in this run (looked for {looked})")
    return found


def label_models(paths: list[Path]) -> dict[str, Path]:
    """Models labelled by directory name, or by their whole path where two share a name
    (runs/a/sft and runs/b/sft), so that no column hides another."""
    names = [p.name for p in paths]
    return {p.name if names.count(p.name) == 1 else str(p): p for p in paths}


def compare(
    models: dict[str, Path],
    world_dir: Path,
    max_new_tokens: int = 96,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """The `chat_eval` figures of every model, by label. Every path is checked before the
    first model is decoded, so that a typo fails at once rather than after minutes of eval."""
    if not any((world_dir / name).is_file() for name in EVAL_FILES.values()):
        raise DataError(
            f"{world_dir}: no SFT eval sets (looked for {', '.join(EVAL_FILES.values())}; "
            "the world stage writes them)"
        )
    for path in models.values():
        if not is_model_dir(path):
            raise CheckpointError(f"{path}: not a model directory (no model.json)")
    results = {}
    for label, path in models.items():
        model, tokenizer = load_model_dir(path, device)
        results[label] = chat_eval(model, tokenizer, world_dir, max_new_tokens)
    return results


def _cell(value: float | int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def _rows(results: dict[str, dict], figures: Sequence[str]) -> list[list[str]]:
    """One row per figure: its name, then each model's value ("–" where a model has none:
    `score` leaves out a figure with no item, e.g. a world without arithmetic)."""
    return [[f, *(_cell(results[label].get(f)) for label in results)] for f in figures]


def rich_table(
    results: dict[str, dict], title: str | None = None, figures: Sequence[str] = FIGURES
) -> Table:
    """The comparison for the terminal: rows are figures, columns are models."""
    table = Table(title=title)
    table.add_column("figure")
    for label in results:
        table.add_column(label, justify="right")
    for row in _rows(results, figures):
        table.add_row(*row)
    return table


def markdown_table(results: dict[str, dict], figures: Sequence[str] = FIGURES) -> str:
    """The same table in Markdown, for a README or a report."""
    lines = [
        "| " + " | ".join(["figure", *results]) + " |",
        "|" + "---|" + "---:|" * len(results),
        *("| " + " | ".join(row) + " |" for row in _rows(results, figures)),
    ]
    return "\n".join(lines) + "\n"


def save_results(
    path: Path,
    results: dict[str, dict[str, float]],
    models: dict[str, Path],
    world_dir: Path,
    max_new_tokens: int,
) -> Path:
    """Write the results as JSON to `path`, with what they were measured on, and the Markdown
    table next to it (`path` with suffix .md); returns the Markdown file's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path,
        {
            "world": str(world_dir),
            "max_new_tokens": max_new_tokens,
            "models": {label: str(p) for label, p in models.items()},
            "results": results,
        },
    )
    markdown = path.with_suffix(".md")
    write_text_atomic(markdown, markdown_table(results))
    return markdown
