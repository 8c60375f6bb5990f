"""`lmforge eval`: models of a run (or given ones) compared on a tiny world's SFT eval sets, the
table printed and written as JSON and Markdown, and the one-line errors of missing inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app, main
from lmforge.config import WorldConfig
from lmforge.eval.chat import FIGURES
from lmforge.eval.compare import compare, label_models, markdown_table
from lmforge.io import save_model_dir
from lmforge.world import write_world

# a quarter of 4 countries and of 4 people are held out: every figure has items to score
TINY_WORLD = WorldConfig(
    n_countries=4,
    n_people=4,
    fact_docs_per_country=1,
    n_stories=0,
    n_arithmetic=4,
    n_eval_arithmetic=2,
    ad_copies=0,
    heldout_docs=0,
    n_sft_facts=0,
    n_sft_arithmetic=0,
    n_sft_refusals=0,
    n_sft_benign=0,
    n_sft_multi_turn=0,
    n_sft_eval_seen=2,
    n_sft_eval_safety=2,
)


def constant_model(make_model, tokenizer, token_id: int):
    """A model whose greedy next token is always `token_id`: dimension 0 of the residual
    stream is 1 for every token and no layer writes to it, and the head reads only it."""
    model = make_model(
        seed=1, vocab_size=tokenizer.vocab_size, tie_embeddings=False, max_seq_len=256
    )
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[token_id, 0] = 1.0
    return model


@pytest.fixture()
def run_dir(tmp_path, make_model, tokenizer) -> Path:
    """A run with a world, a "base" that never ends its turn (it repeats one word) and an
    "sft" that ends every turn at once (<|end|> first)."""
    write_world(TINY_WORLD, tmp_path / "run" / "world")
    word = tokenizer.encode("the")[0]
    save_model_dir(
        tmp_path / "run" / "pretrain", constant_model(make_model, tokenizer, word), tokenizer
    )
    ends = constant_model(make_model, tokenizer, tokenizer.end_id)
    save_model_dir(tmp_path / "run" / "sft", ends, tokenizer)
    return tmp_path / "run"


def test_eval_run_writes_table_json_and_markdown(run_dir):
    result = CliRunner().invoke(app, ["eval", "--run", str(run_dir), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    for word in ("base", "sft", *FIGURES):
        assert word in result.output

    record = json.loads((run_dir / "eval.json").read_text())
    assert record["world"] == str(run_dir / "world") and record["max_new_tokens"] == 6
    assert record["models"] == {"base": str(run_dir / "pretrain"), "sft": str(run_dir / "sft")}
    results = record["results"]
    assert list(results) == ["base", "sft"]
    for label in results:
        assert set(results[label]) == set(FIGURES), label
        assert all(0.0 <= v <= 1.0 for v in results[label].values()), label
    # the base never ends a turn; the sft model ends every one, with an empty reply that
    # answers nothing and refuses nothing
    assert results["base"]["end_token_rate"] == 0.0
    assert results["sft"] == {**dict.fromkeys(FIGURES, 0.0), "end_token_rate": 1.0}

    markdown = (run_dir / "eval.md").read_text().splitlines()
    assert markdown[:2] == ["| figure | base | sft |", "|---|---:|---:|"]
    assert len(markdown) == 2 + len(FIGURES)
    assert [line.split(" | ")[0] for line in markdown[2:]] == [f"| {f}" for f in FIGURES]
    assert "| end_token_rate | 0.000 | 1.000 |" in markdown


def test_eval_given_models_without_run(run_dir, tmp_path, make_model, tokenizer):
    other = tmp_path / "other" / "sft"  # a second "sft": both are labelled by their path
    model = make_model(seed=5, vocab_size=tokenizer.vocab_size, max_seq_len=256, init_std=0.3)
    save_model_dir(other, model, tokenizer)
    args = ["eval", "--model", str(run_dir / "sft"), "--model", str(other)]
    args += ["--world", str(run_dir / "world"), "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (run_dir / "eval.json").exists()  # no --run, no --out: only printed

    models = label_models([run_dir / "sft", other, run_dir / "pretrain"])
    assert list(models) == [str(run_dir / "sft"), str(other), "pretrain"]
    results = compare(models, run_dir / "world", max_new_tokens=4)
    assert results[str(run_dir / "sft")]["end_token_rate"] == 1.0
    assert results["pretrain"]["end_token_rate"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in results[str(other)].values())


def test_markdown_marks_missing_figures():
    table = markdown_table({"a": {"end_token_rate": 0.5}, "b": {"end_token_rate": 0.25}})
    assert "| end_token_rate | 0.500 | 0.250 |" in table
    assert "| arith_accuracy | – | – |" in table


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the `lmforge` entry point; its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_errors_are_one_line_naming_the_path(run_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    code, err = _main(monkeypatch, capsys, "eval", "--run", str(empty))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {empty}: no model directory in this run")

    code, err = _main(monkeypatch, capsys, "eval", "--run", str(run_dir), "--world", str(empty))
    assert code == 2 and err.startswith(f"error: {empty}: no SFT eval sets")

    missing = tmp_path / "nowhere"
    code, err = _main(monkeypatch, capsys, "eval", "--run", str(run_dir), "--model", str(missing))
    assert code == 2 and err.startswith(f"error: {missing}: not a model directory")

    code, err = _main(monkeypatch, capsys, "eval", "--model", str(run_dir / "sft"))
    assert code == 2 and "give --run, or --model and --world" in err
