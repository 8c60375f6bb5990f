"""SFT on the real instruction sets in ../shared/data (each test skips when its file is
absent): every record becomes a conversation, Alpaca-wrapped prompts are unwrapped, loss masks
and the too-long report are right, and the stage trains end to end (a subprocess, as a user
runs it)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.readers import DataError
from lmforge.data.sft import ALPACA_PREAMBLE, encode, read_conversations, to_messages
from lmforge.io import save_model_dir
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DOLLY = DATA / "sft_dolly_hhrlhf_small" / "dolly_hhrlhf_train_small.jsonl"
ALPACA_EN = DATA / "sft_alpaca_demo_noncommercial" / "alpaca_en_demo.json"
ALPACA_ZH = DATA / "sft_alpaca_demo_noncommercial" / "alpaca_zh_demo.json"
# wide columns: rich would wrap the console's file:line reports at 80
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
SMALL_LEN = 128  # tokens: short enough that every file has conversations too long for it


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"real SFT data not found at {path}")


FILES = [pytest.param(p, marks=needs(p), id=p.name) for p in (DOLLY, ALPACA_EN, ALPACA_ZH)]


def raw_records(path: Path) -> list[dict]:
    """The file's records read without lmforge: the count to check against."""
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def locations(path: Path) -> list[str]:
    """Where each record is: `file:[i]` in a JSON array, `file:line` in JSON Lines."""
    if path.suffix == ".json":
        return [f"{path}:[{i}]" for i in range(len(raw_records(path)))]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [f"{path}:{n}" for n, line in enumerate(lines, start=1) if line.strip()]


def record_at(where: str) -> dict:
    """The raw record that a location names."""
    path = Path(where.rpartition(":")[0])
    return raw_records(path)[locations(path).index(where)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a slice of every file present; it encodes any text."""
    texts = [
        text
        for path in (DOLLY, ALPACA_EN, ALPACA_ZH)
        if path.exists()
        for record in raw_records(path)[:300]
        for text in record.values()
    ]
    if not texts:
        pytest.skip(f"no real SFT data under {DATA}")
    return train_tokenizer(texts, vocab_size=1024)


@pytest.mark.parametrize("path", FILES)
def test_every_record_becomes_a_plain_conversation(path):
    records = raw_records(path)
    assert len(records) == {DOLLY: 1000, ALPACA_EN: 999, ALPACA_ZH: 1000}[path]  # SOURCE.md
    convs = read_conversations(path)
    assert len(convs) == len(records)
    assert [where for where, _ in convs] == locations(path)
    for (_, messages), record in zip(convs, records):
        user, assistant = messages
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert "### Instruction" not in user["content"] and ALPACA_PREAMBLE not in user["content"]
        assert "### Response" not in user["content"]
        assert assistant["content"] == record.get("response", record.get("output"))


@needs(DOLLY)
def test_dolly_prompts_are_unwrapped_to_the_instruction():
    convs = read_conversations(DOLLY)
    assert convs[0][0] == f"{DOLLY}:1"
    assert convs[0][1][0]["content"] == "what is kangen water?"
    # instruction + context (dolly's closed QA) stays whole, joined by mosaicml's newline
    fallout = next(m[0]["content"] for _, m in convs if "Fallout game" in m[0]["content"])
    assert fallout.startswith("When was the first Fallout game released?\nFallout is a series")
    assert fallout.endswith("nearly ten years after Wasteland.[6]")


@needs(ALPACA_EN)
def test_alpaca_input_follows_the_instruction():
    records = raw_records(ALPACA_EN)
    convs = read_conversations(ALPACA_EN)
    i = next(i for i, r in enumerate(records) if r["input"])
    assert convs[i][0] == f"{ALPACA_EN}:[{i}]"
    assert convs[i][1][0]["content"] == f"{records[i]['instruction']}\n\n{records[i]['input']}"
    assert sum(bool(r["input"]) for r in records) == 412


@pytest.mark.parametrize("path", FILES)
def test_loss_mask_is_exactly_the_response_and_end(path, tokenizer):
    convs = read_conversations(path)
    for where, messages in [convs[0], convs[1], convs[len(convs) // 2], convs[-1]]:
        ids, mask = tokenizer.render_chat(messages)
        response = tokenizer.encode(messages[1]["content"]) + [tokenizer.end_id]
        assert [t for t, m in zip(ids, mask) if m] == response, where
        assert mask[-len(response) :] == [True] * len(response) and ids[-1] == tokenizer.end_id
        prompt = ids[: -len(response)]
        assert tokenizer.decode(prompt, skip_special=True) == messages[0]["content"], where


@pytest.mark.parametrize("path", FILES)
def test_too_long_conversations_are_dropped_and_named(path, tokenizer):
    convs = read_conversations(path)
    out = encode(convs, tokenizer, max_len=SMALL_LEN)
    # single-turn records: a conversation fits whole or is dropped, never shortened
    assert out.shortened == []
    assert out.dropped and len(out.examples) + len(out.dropped) == len(convs)
    pattern = rf"{re.escape(str(path))}:" + (r"\[\d+\]" if path.suffix == ".json" else r"\d+")
    lengths = {where: len(tokenizer.render_chat(m)[0]) for where, m in convs}
    for where in out.dropped:
        assert re.fullmatch(pattern, where) and lengths[where] > SMALL_LEN
    # the location names the record itself: re-rendering the raw record gives the same length
    where = out.dropped[0]
    assert len(tokenizer.render_chat(to_messages(record_at(where), where))[0]) == lengths[where]
    assert all(len(e.ids) <= SMALL_LEN for e in out.examples)


@pytest.mark.parametrize(
    "path, index, field",
    [
        pytest.param(DOLLY, 6, "response", marks=needs(DOLLY), id="jsonl"),
        pytest.param(ALPACA_ZH, 6, "output", marks=needs(ALPACA_ZH), id="json-array"),
    ],
)
def test_a_broken_real_record_is_named(tmp_path, path, index, field):
    records = raw_records(path)
    records[index][field] = None
    copy = tmp_path / path.name
    if path.suffix == ".json":
        copy.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        where = rf"{path.name}:\[{index}\]"
    else:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        copy.write_text(lines, encoding="utf-8")
        where = rf"{path.name}:{index + 1}"
    with pytest.raises(DataError, match=rf"{where}: prompt and response must be strings"):
        read_conversations(copy)


def run_sft(base: Path, data: Path, out: Path) -> tuple[dict, str]:
    """`lmforge sft` on `data` for a few steps: (summary.json, the console log)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "sft", "--out", str(out)]
        + [f"sft.model={base}", f"sft.data={data}", f"sft.max_len={SMALL_LEN}"]
        + ["sft.max_steps=6", "sft.micro_batch_size=8", "sft.lr=3e-3", "sft.warmup_steps=1"]
        + ["sft.eval_base=false", "sft.device=cpu", "sft.num_threads=1"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "sft" / "summary.json").read_text()), proc.stderr


@pytest.fixture(scope="module")
def base_model(tokenizer, make_model_config, tmp_path_factory) -> Path:
    """A tiny randomly initialised model directory with the data's tokenizer."""
    torch.manual_seed(0)
    cfg = make_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=SMALL_LEN)
    directory = tmp_path_factory.mktemp("base")
    save_model_dir(directory, Transformer(cfg), tokenizer)
    return directory


@pytest.mark.parametrize("path", [FILES[0], FILES[2]])
def test_sft_stage_end_to_end(path, tokenizer, base_model, tmp_path):
    summary, log = run_sft(base_model, path, tmp_path / "run")
    expected = encode(read_conversations(path), tokenizer, SMALL_LEN)
    # nothing lost silently: every record is trained on, held out or reported as dropped
    used = summary["examples"] + summary["val_examples"]
    assert used == len(expected.examples)
    assert used + summary["dropped_too_long"] == len(raw_records(path))
    assert summary["dropped_too_long"] == len(expected.dropped) > 0
    assert summary["dropped_too_long_where"] == expected.dropped[:20]
    assert summary["shortened_to_whole_turns"] == 0
    for where in expected.dropped[:20]:  # verbatim: "x.jsonl:100:" once printed as an emoji
        assert f"dropped {where}: its first reply does not fit in {SMALL_LEN}" in log
    if len(expected.dropped) > 20:
        assert f"and {len(expected.dropped) - 20} more" in log
    assert f"{len(expected.dropped)} dropped and 0 shortened" in log
    # a random model starts near uniform over the vocabulary, and training lowers the loss
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert abs(summary["first_loss"] - math.log(tokenizer.vocab_size)) < 0.3
    assert summary["train_loss"] < summary["first_loss"]
    assert (tmp_path / "run" / "sft" / "model.safetensors").exists()
