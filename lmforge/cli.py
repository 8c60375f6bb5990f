"""The `lmforge` command line."""

from __future__ import annotations

import importlib
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


@app.command()
def run(
    config: Path = CONFIG,
    out: Path = OUT,
    resume: bool = typer.Option(
        False, help="continue pretrain, sft, grpo and ppo from their newest checkpoints"
    ),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Run the pipeline the config lists (default: world, clean, tokenizer, pretrain, sft, rm,
    dpo, grpo)."""
    from lmforge.pipeline import run_pipeline
    from lmforge.train_utils import leave_process_group

    cfg = _config(config, overrides)
    summaries = run_pipeline(cfg, out, resume=resume)
    leave_process_group()
    for name, summary in summaries.items():
        _print_summary(name, summary)


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


# stages with no options of their own: a config, the run directory and overrides
STAGE_HELP = {
    "world": "Generate the built-in synthetic world into OUT/world/.",
    "tokenizer": "Train the BPE tokenizer into OUT/tokenizer/.",
    "rlaif": "Pairs of the SFT model's replies labelled by an AI judge, then DPO, into OUT/rlaif/.",
}
# and those that checkpoint as they train, which take --resume too
RESUMABLE_HELP = {
    "pretrain": "Pretrain a base model into OUT/pretrain/ (runs under torchrun too).",
    "sft": "Fine-tune the base model on chat conversations into OUT/sft/ (runs under torchrun too).",
    "rm": "Train a reward model on comparisons into OUT/rm/ (held-out accuracy, best-of-N).",
    "dpo": "DPO, IPO, SimPO or ORPO (dpo.loss) on preference pairs into OUT/dpo/.",
    "kto": "KTO on unpaired good/bad labels into OUT/kto/.",
    "grpo": "GRPO or RLOO with verifiable rewards (word problems) into OUT/grpo/.",
    "ppo": "PPO against the reward model with a KL penalty (ppo.ptx_coef: PPO-ptx) into OUT/ppo/.",
}


def _stage_command(name: str) -> None:
    def command(config: Path = CONFIG, out: Path = OUT, overrides: list[str] = OVERRIDES) -> None:
        stage = importlib.import_module(f"lmforge.stages.{name}")
        _print_summary(name, stage.run(_config(config, overrides), out))

    command.__doc__ = STAGE_HELP[name]
    app.command(name=name)(command)


def _resumable_command(name: str) -> None:
    def command(
        config: Path = CONFIG,
        out: Path = OUT,
        resume: bool = typer.Option(False, help="continue from the newest checkpoint"),
        overrides: list[str] = OVERRIDES,
    ) -> None:
        from lmforge.train_utils import leave_process_group

        stage = importlib.import_module(f"lmforge.stages.{name}")
        summary = stage.run(_config(config, overrides), out, resume=resume)
        leave_process_group()
        if summary:  # under torchrun, only rank 0 returns one
            _print_summary(name, summary)

    command.__doc__ = RESUMABLE_HELP[name]
    app.command(name=name)(command)


for _name in RESUMABLE_HELP:
    _resumable_command(_name)
for _name in STAGE_HELP:
    _stage_command(_name)


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
    best_of: int = typer.Option(
        1, "--best-of", min=1, help="sample N replies and keep the reward model's favourite"
    ),
    reward_model: Path = typer.Option(
        None, "--reward-model", help="reward model directory (lmforge rm: OUT/rm/model)"
    ),
) -> None:
    """Complete prompts with a base (or any) model; with --reward-model, answer them as chat
    turns and print the best of --best-of samples by reward."""
    from lmforge.generate import generate as sample
    from lmforge.io import load_model_dir

    net, tok = load_model_dir(model)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, pad_id=tok.pad_id)
    if reward_model is None:
        if best_of > 1:
            raise typer.BadParameter("--best-of needs --reward-model to choose with")
        ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
        outs = sample(net, ids, max_tokens, stop_ids=[tok.eos_id], seed=seed, **options)
        for prompt, new in zip(prompts, outs):
            typer.echo(prompt + tok.decode(new))
        return
    from lmforge.model.reward import load_reward_model, score

    scorer, _, stats = load_reward_model(reward_model)
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        ids = tok.render_chat(messages, add_generation_prompt=True)[0]
        outs = sample(
            net, [ids] * best_of, max_tokens, stop_ids=[tok.end_id], seed=seed + i, **options
        )
        texts = [tok.decode(o) for o in outs]
        rewards = score(scorer, tok, [(messages, t) for t in texts], net.cfg.max_seq_len)
        best = max(range(best_of), key=lambda j: rewards[j])
        z = (rewards[best] - stats["reward_mean"]) / max(stats["reward_std"], 1e-6)
        typer.echo(f"{texts[best]}\n[reward {rewards[best]:.3f} ({z:+.2f} sd), best of {best_of}]")


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
            temperature=temperature,
            top_p=top_p,
            stop_ids=[tok.end_id, tok.eos_id],
            pad_id=tok.pad_id,
            seed=seed + turn,
        )[0]
        reply = tok.decode(new)
        messages.append({"role": "assistant", "content": reply})
        typer.echo(f"model> {reply}")


@app.command()
def export(
    model: Path = typer.Option(None, "--model", "-m", help="model directory to export"),
    adapter: Path = typer.Option(
        None, "--adapter", help="LoRA adapter directory (e.g. runs/default/sft/adapter)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Hugging Face directory to write"),
    base: str = typer.Option(
        None, "--base", help="with --adapter: the exported base model's directory or hub name"
    ),
) -> None:
    """Export a model directory in Hugging Face format (transformers loads it as is), or a
    LoRA adapter directory as a PEFT adapter (PeftModel loads it onto the exported base)."""
    from lmforge.model.hf import export_hf, export_peft

    if (model is None) == (adapter is None):
        raise typer.BadParameter("give exactly one of --model and --adapter")
    if adapter is None:
        if base is not None:
            raise typer.BadParameter("--base goes with --adapter (the adapter's base model)")
        export_hf(model, out)
    else:
        export_peft(adapter, out, base)
    typer.echo(f"exported {model or adapter} to {out}")


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="Hugging Face model directory, or hub name"),
    out: Path = typer.Option(..., "--out", "-o", help="lmforge model directory to write"),
) -> None:
    """Import a Llama or Qwen2 Hugging Face checkpoint (safetensors) as a model directory."""
    from lmforge.model.hf import import_hf

    cfg = import_hf(source, out)
    typer.echo(f"imported {source} to {out}: " + json.dumps(cfg.model_dump()))


@app.command("eval")
def eval_(
    run: Path = typer.Option(
        None, "--run", "-r", help="run directory: its pretrain/ and sft/ models and world/"
    ),
    models: list[Path] = typer.Option(
        None, "--model", "-m", help="model directory, repeatable (default: the run's models)"
    ),
    world: Path = typer.Option(None, "--world", help="world directory (default: RUN/world)"),
    out: Path = typer.Option(
        None, "--out", "-o", help="results JSON (default: RUN/eval.json); the table goes to .md"
    ),
    max_new_tokens: int = typer.Option(96, min=1, help="longest reply decoded"),
) -> None:
    """Compare models in chat format on the world's held-out SFT eval sets."""
    from rich.console import Console

    from lmforge.eval.compare import compare, label_models, rich_table, run_models, save_results
    from lmforge.train_utils import setup_device

    if run is None and not (models and world):
        raise typer.BadParameter("give --run, or --model and --world")
    labelled = label_models(models) if models else run_models(run)
    world = world or run / "world"
    out = out or (run / "eval.json" if run else None)
    results = compare(labelled, world, max_new_tokens, setup_device("auto").device)
    Console().print(rich_table(results, title=f"chat eval on {world}"))
    if out:
        markdown = save_results(out, results, labelled, world, max_new_tokens)
        typer.echo(f"wrote {out} and {markdown}")


@app.command()
def ablate(
    name: str = typer.Argument(..., help="sft-init, sft-replay or sft-lora"),
    config: Path = CONFIG,
    out: Path = OUT,
    overrides: list[str] = OVERRIDES,
) -> None:
    """Run one stage under each setting of an ablation in an existing run; tabulate the figures."""
    from lmforge.ablations import ABLATIONS, run_ablation

    if name not in ABLATIONS:
        raise typer.BadParameter(f"unknown ablation {name!r}; choose from {sorted(ABLATIONS)}")
    run_ablation(name, out, config, overrides)
    typer.echo((out / "ablations" / f"{name}.md").read_text(encoding="utf-8"))


@app.command()
def experiment(
    name: str = typer.Argument(..., help="overoptimization"),
    config: Path = CONFIG,
    out: Path = OUT,
    overrides: list[str] = OVERRIDES,
) -> None:
    """Run an experiment in an existing run (DIR/experiments/NAME/: plots and a report)."""
    from lmforge import experiments

    if name != "overoptimization":
        raise typer.BadParameter(f"unknown experiment {name!r}; choose from ['overoptimization']")
    experiments.overoptimization(_config(config, overrides), out)
    typer.echo((out / experiments.NAME / "report.md").read_text(encoding="utf-8"))


@app.command()
def serve(
    path: Path = typer.Argument(
        ..., help="stage directory, model directory or Hugging Face export"
    ),
    host: str = typer.Option(
        "127.0.0.1", help="address to bind; beyond loopback a token is required"
    ),
    port: int = typer.Option(8000, min=0, max=65535),
    token: str = typer.Option(
        None, envvar="LMFORGE_TOKEN", help="access token the API requires (Authorization: Bearer)"
    ),
    db: Path = typer.Option(Path("feedback.sqlite3"), help="SQLite database of the feedback"),
    name: str = typer.Option(None, help="model name in the API (default: the directory's name)"),
    max_tokens: int = typer.Option(512, min=1, help="longest answer a request may ask for"),
    max_body_bytes: int = typer.Option(262_144, min=1024, help="largest request body"),
    max_batch: int = typer.Option(16, min=1, help="rows decoded together"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    access_log: bool = typer.Option(False, help="log every request"),
) -> None:
    """Serve a model: the feedback web app at /, and the OpenAI API at /v1."""
    from lmforge.serve.app import Limits
    from lmforge.serve.app import serve as run_server

    limits = Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_k=min(8, max_batch))
    try:
        run_server(path, host, port, token, db, name, limits, max_batch, device, access_log)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


feedback_app = typer.Typer(
    no_args_is_help=True, help="Human feedback collected by `lmforge serve`."
)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    db: Path = typer.Option(Path("feedback.sqlite3"), help="the server's SQLite database"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the .jsonl files"),
) -> None:
    """Write judgements as pairs, rankings and KTO labels that rm, dpo and kto read."""
    from lmforge.serve.store import export_feedback

    try:
        summary = export_feedback(db, out)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"wrote {out}: " + json.dumps(summary))


def main() -> None:
    """Entry point: user errors print one clear line, not a stack trace."""
    try:
        app()
    except USER_ERRORS as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
