"""Every lmforge stage on an imported Hugging Face checkpoint: a tiny Qwen2 (q/k/v bias, GQA)
with its own ChatML specials and chat template goes through `lmforge import`, continued
pretraining, SFT (full and LoRA) and `lmforge export`, and transformers computes what lmforge
computes on the result. Training runs are subprocesses of `python -m lmforge`, as a user
runs them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    CHATML_MARKERS,
    CHATML_SPECIALS,
    CHATML_TEMPLATE,
    corpus_lines,
    forward_logits,
    hf_ids,
    lmforge,
    losses,
    make_hf_model,
    own_specials_tokenizer,
)
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.io import load_model_dir

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the capital city of 中国?"},
    {"role": "assistant", "content": "北京 is the capital city"},
    {"role": "user", "content": "and the river 12+7"},
]


def assert_trained(stage_dir: Path) -> None:
    values = losses(stage_dir)
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0], values


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The imported model directory, a text corpus and SFT conversations."""
    root = tmp_path_factory.mktemp("hf_stages")
    hf_tok = own_specials_tokenizer(CHATML_MARKERS, CHATML_TEMPLATE, **CHATML_SPECIALS)
    make_hf_model("qwen2", len(hf_tok), tie=False, n_kv_heads=2).save_pretrained(root / "hf")
    hf_tok.save_pretrained(root / "hf")
    result = CliRunner().invoke(app, ["import", str(root / "hf"), "--out", str(root / "ours")])
    assert result.exit_code == 0, result.output
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_lines(200)))
    # short chats (the model has 64 positions): repeat two words back, reversed
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    sft = root / "sft.jsonl"
    with sft.open("w") as f:
        for a, b in zip(words * 3, words[3:] + words * 2):
            user, reply = {"role": "user", "content": f"{a} {b}?"}, f"{b} {a}."
            chat = [{"role": "system", "content": "be brief"}, user]
            f.write(json.dumps({"messages": [*chat, {"role": "assistant", "content": reply}]}))
            f.write("\n")
    return {"model": root / "ours", "corpus": corpus, "sft": sft}


def test_continued_pretraining_from_imported_model(inputs, tmp_path):
    proc = lmforge(
        "pretrain", "--out", tmp_path, f"pretrain.init_from={inputs['model']}",
        f"pretrain.corpus={inputs['corpus']}", "pretrain.seq_len=32", "pretrain.max_steps=6",
        "pretrain.micro_batch_size=8", "pretrain.warmup_steps=1", "pretrain.val_fraction=0.1",
        "pretrain.eval_batches=1", "pretrain.n_samples=0", "pretrain.num_threads=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_trained(tmp_path / "pretrain")
    summary = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert summary["init_from"] == str(inputs["model"])
    # the imported model's config and tokenizer, not the default `model` section's
    base, base_tok = load_model_dir(inputs["model"])
    model, tok = load_model_dir(tmp_path / "pretrain")
    assert model.cfg == base.cfg and model.cfg.qkv_bias
    assert tok.sha256() == base_tok.sha256() and tok.end_id == base_tok.end_id


SFT = ["sft.max_steps=8", "sft.eval_base=false", "sft.replay_fraction=0", "sft.max_len=64"]
SFT += ["sft.warmup_steps=1", "sft.micro_batch_size=8", "sft.num_threads=1"]


def test_sft_of_imported_model_exports_to_transformers(inputs, tmp_path):
    proc = lmforge(
        "sft", "--out", tmp_path, f"sft.model={inputs['model']}", f"sft.data={inputs['sft']}", *SFT
    )
    assert proc.returncode == 0, proc.stderr
    assert_trained(tmp_path / "sft")
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]
    )
    assert result.exit_code == 0, result.output
    model, tok = load_model_dir(tmp_path / "sft")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        forward_logits(hf_model, idx), forward_logits(model, idx), atol=1e-4, rtol=0
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages, prompt in ((CHAT[:3], False), (CHAT, True)):
        got = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        assert hf_ids(got) == tok.render_chat(messages, add_generation_prompt=prompt)[0]
    # generation stops at the end of a reply as well as at eos
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, hf_tok.convert_tokens_to_ids("<|im_end|>")]


def test_lora_sft_of_imported_model(inputs, tmp_path):
    proc = lmforge(
        "sft", "--out", tmp_path, f"sft.model={inputs['model']}", f"sft.data={inputs['sft']}",
        *SFT, "sft.method=lora", "sft.lr=1e-2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_trained(tmp_path / "sft")
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_fraction"] < 1
    assert (tmp_path / "sft" / "adapter").is_dir()
