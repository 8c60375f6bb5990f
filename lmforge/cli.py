"""The `lmforge` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lmforge.config import ConfigError, RunConfig, load_config
from lmforge.data.readers import DataError
from lmforge.io import CheckpointError
from lmforge.tokenizer import TokenizerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lmforge: clean, tokenize, pretrain, fine-tune and align language models.",
)

CONFIG = typer.Option(None, "--config", "-c", help="TOML config (default: the built-in pipeline)")
OUT = typer.Option(Path("runs/default"), "--out", "-o", help="run directory")
OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. pretrain.max_steps=100")
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)


def _config(config: Path | None, overrides: list[str] | None) -> RunConfig:
    return load_config(config, overrides or [])


def _print_summary(name: str, summary: dict) -> None:
    typer.echo(f"{name}: " + json.dumps(summary, ensure_ascii=False))


def _training_stage(
    name: str, config: Path | None, out: Path, resume: bool, overrides: list[str] | None
) -> None:
    """Run a resumable stage; under torchrun only rank 0 returns a summary to print."""
    from lmforge.pipeline import STAGES

    summary = STAGES[name](_config(config, overrides), out, resume=resume)
    if summary:
        _print_summary(name, summary)


@app.command()
def run(
    config: Path = CONFIG,
    out: Path = OUT,
    resume: bool = typer.Option(
        False, help="continue pretraining and SFT from their newest checkpoints"
    ),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Run the pipeline the config lists (default: world, clean, tokenizer, pretrain)."""
    from lmforge.pipeline import run_pipeline

    cfg = _config(config, overrides)
    for name, summary in run_pipeline(cfg, out, resume=resume).items():
        _print_summary(name, summary)


@app.command()
def world(config: Path = CONFIG, out: Path = OUT, overrides: list[str] = OVERRIDES) -> None:
    """Generate the built-in synthetic world into OUT/world/."""
    from lmforge.stages import world as stage

    _print_summary("world", stage.run(_config(config, overrides), out))


@app.command()
def clean(
    config: Path = CONFIG,
    out: Path = OUT,
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="count and report malformed records instead of failing"
    ),
    workers: int = typer.Option(None, "--workers", min=1, help="worker processes (clean.workers)"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Clean the raw corpus into OUT/clean/ (corpus.jsonl, DATA_CARD.md)."""
    from lmforge.stages import clean as stage

    options = [*(overrides or [])]
    if skip_bad:
        options.append("clean.skip_bad=true")
    if workers is not None:
        options.append(f"clean.workers={workers}")
    _print_summary("clean", stage.run(_config(config, options), out))


@app.command()
def tokenizer(config: Path = CONFIG, out: Path = OUT, overrides: list[str] = OVERRIDES) -> None:
    """Train the BPE tokenizer into OUT/tokenizer/."""
    from lmforge.stages import tokenizer as stage

    _print_summary("tokenizer", stage.run(_config(config, overrides), out))


@app.command()
def pretrain(
    config: Path = CONFIG,
    out: Path = OUT,
    resume: bool = typer.Option(False, help="continue from the newest checkpoint"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Pretrain a base model into OUT/pretrain/ (runs under torchrun too)."""
    _training_stage("pretrain", config, out, resume, overrides)


@app.command()
def sft(
    config: Path = CONFIG,
    out: Path = OUT,
    resume: bool = typer.Option(False, help="continue from the newest checkpoint"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Fine-tune the base model on chat conversations into OUT/sft/ (runs under torchrun too)."""
    _training_stage("sft", config, out, resume, overrides)


MODEL = typer.Option(..., "--model", "-m", help="model directory (e.g. runs/default/pretrain)")


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="one or more prompts, completed as a batch"),
    model: Path = MODEL,
    max_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.8, min=0.0),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
) -> None:
    """Complete prompts with a base (or any) model."""
    from lmforge.generate import generate as sample
    from lmforge.io import load_model_dir

    net, tok = load_model_dir(model)
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    outs = sample(net, ids, max_tokens, temperature, top_k, top_p, [tok.eos_id], tok.pad_id, seed)
    for prompt, new in zip(prompts, outs):
        typer.echo(prompt + tok.decode(new))


@app.command()
def chat(
    model: Path = MODEL,
    system: str = typer.Option("", help="system message"),
    max_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.7, min=0.0),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    seed: int = typer.Option(0),
) -> None:
    """Talk to a model with the chat template (empty line or Ctrl-D ends)."""
    from lmforge.generate import generate as sample
    from lmforge.io import load_model_dir

    net, tok = load_model_dir(model)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in range(10**9):
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        room = net.cfg.max_seq_len - len(ids)
        if room < 1:
            typer.echo("(the conversation is longer than the model's context; start a new one)")
            break
        new = sample(
            net,
            [ids],
            min(max_tokens, room),
            temperature,
            0,
            top_p,
            [tok.end_id, tok.eos_id],
            tok.pad_id,
            seed + turn,
        )[0]
        reply = tok.decode(new)
        messages.append({"role": "assistant", "content": reply})
        typer.echo(f"model> {reply}")


@app.command()
def export(
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", "-o", help="Hugging Face model directory to write"),
) -> None:
    """Export a model directory in Hugging Face format (transformers loads it as is)."""
    from lmforge.model.hf import export_hf

    export_hf(model, out)
    typer.echo(f"exported {model} to {out}")


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="Hugging Face model directory, or hub name"),
    out: Path = typer.Option(..., "--out", "-o", help="lmforge model directory to write"),
) -> None:
    """Import a Llama or Qwen2 Hugging Face checkpoint (safetensors) as a model directory."""
    from lmforge.model.hf import import_hf

    cfg = import_hf(source, out)
    typer.echo(f"imported {source} to {out}: " + json.dumps(cfg.model_dump()))


def main() -> None:
    """Entry point: user errors print one clear line, not a stack trace."""
    try:
        app()
    except USER_ERRORS as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
