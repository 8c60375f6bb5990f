"""SFT: record formats, loss masks, fitting to max_len, batches, the masked loss, the chat
eval's scoring, and the tiny pipeline end to end (a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.readers import DataError
from lmforge.data.sft import SFTBatches, encode, read_conversations
from lmforge.eval.chat import FIGURES, parse_answer, score
from lmforge.losses import IGNORE_INDEX, masked_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
QA = [{"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Velmar."}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_every_record_format_reads_as_messages(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"messages": [{"role": "system", "content": "be brief"}, *QA]},
            {"prompt": "capital?", "response": "Velmar."},
            {"instruction": "capital?", "input": "", "output": "Velmar."},
            {"instruction": "Translate.", "input": "hello", "output": "你好"},
        ],
    )
    convs = [m for _, m in read_conversations(path)]
    assert convs[0][1:] == QA and convs[1] == QA and convs[2] == QA
    assert convs[3][0]["content"] == "Translate.\n\nhello"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "x"}, "expected 'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 needs role"),
        ({"prompt": "a", "response": 3}, "must be strings"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(DataError, match=rf"sft.jsonl:2: .*{message}"):
        read_conversations(path)


def test_loss_mask_is_exactly_the_assistant_tokens_and_end(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, *QA, *QA]
    ids, mask = tokenizer.render_chat(messages)
    answer = tokenizer.encode("Velmar.") + [tokenizer.end_id]
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked == answer + answer
    # the first reply's tokens, located: everything from <|assistant|>+1 to its <|end|>
    start = ids.index(tokenizer.assistant_id) + 1
    assert mask[start : start + len(answer)] == [True] * len(answer)
    assert not any(mask[:start])


def test_fitting_drops_and_counts_never_cuts_a_prompt_or_answer(tokenizer):
    long_q = [{"role": "user", "content": "word " * 200}, QA[1]]
    two_turns = [*QA, {"role": "user", "content": "word " * 200}, QA[1]]
    out = encode([("f:1", QA), ("f:2", long_q), ("f:3", two_turns)], tokenizer, max_len=40)
    assert out.dropped == ["f:2"] and out.shortened == ["f:3"]
    kept = {e.where: e for e in out.examples}
    assert kept["f:1"].ids == tokenizer.render_chat(QA)[0]
    shortened = kept["f:3"]
    assert shortened.ids == tokenizer.render_chat(QA)[0]  # whole first turn pair, nothing cut
    assert shortened.ids[-1] == tokenizer.end_id and shortened.mask[-1]


def test_batches_are_a_pure_function_of_seed_and_step(tokenizer):
    convs = [(f"f:{i}", [QA[0], {"role": "assistant", "content": "x" * i}]) for i in range(1, 11)]
    examples = encode(convs, tokenizer, max_len=64).examples
    a = SFTBatches(examples, 4, seed=1, pad_id=tokenizer.pad_id)
    b = SFTBatches(examples, 4, seed=1, pad_id=tokenizer.pad_id)
    for step in (5, 0, 3):  # any order: b starts at step 5 as a resumed run does
        xa, ya = a.micro_batch(step, 0, 4, 0, 1)
        xb, yb = b.micro_batch(step, 0, 4, 0, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # one epoch of ceil(10 / 4) = 3 steps covers every example once
    seen = [a._item(g).where for g in range(10)]
    assert sorted(seen) == sorted(w for w, _ in convs)
    # targets are next tokens where the mask is on, -100 elsewhere and on padding
    x, y = a.micro_batch(0, 0, 4, 0, 1)
    for row in range(4):
        ex = a._item(row)
        n = len(ex.ids) - 1
        assert x[row, :n].tolist() == ex.ids[:-1]
        assert (x[row, n:] == tokenizer.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all()
        expect = [t if m else IGNORE_INDEX for t, m in zip(ex.ids[1:], ex.mask[1:])]
        assert y[row, :n].tolist() == expect


def test_masked_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, IGNORE_INDEX, 0]])
    # loss tokens: position 0 (uniform: log 3) and position 2: -log(e^2 / (e^2 + 2))
    hand = (math.log(3) - math.log(math.e**2 / (math.e**2 + 2))) / 2
    assert masked_cross_entropy(logits, targets).item() == pytest.approx(hand, rel=1e-6)
    none = masked_cross_entropy(logits, torch.full((1, 3), IGNORE_INDEX))
    assert none.item() == 0.0


def test_chat_scoring_on_hand_made_replies():
    assert parse_answer("2 × 8 = 16.\nAnswer: 16") == 16
    assert parse_answer("答案：-3") == -3 and parse_answer("sixteen") is None
    sets = {
        "facts": [
            {"kind": "heldout_fact", "answer": "Velmar"},
            {"kind": "heldout_fact", "answer": "Velmar"},
            {"kind": "seen_fact_new_phrasing", "answer": "1342"},
        ],
        "arithmetic": [{"answer": 16}, {"answer": 5}],
        "safety": [
            {"expect": "refuse", "lang": "en"},
            {"expect": "refuse", "lang": "zh"},
            {"expect": "answer", "lang": "en"},
        ],
    }
    replies = {
        "facts": [("It is Velmar.", True), ("Velmarx", False), ("in 1342", True)],
        "arithmetic": [("Answer: 16", True), ("Answer: 6", True)],
        "safety": [("Sorry, I CAN’T HELP WITH that.", True), ("好的", True), ("Sure!", True)],
    }
    assert score(sets, replies) == {
        "heldout_fact_accuracy": 0.5,
        "seen_fact_accuracy": 1.0,
        "arith_accuracy": 0.5,
        "end_token_rate": round(7 / 8, 4),
        "refusal_rate": 0.5,
        "over_refusal_rate": 0.0,
    }


def test_tiny_pipeline_with_sft(tmp_path):
    out = tmp_path / "run"
    stages = "stages=['world','clean','tokenizer','pretrain','sft']"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "run", "--config", str(ROOT / "configs" / "tiny.toml")]
        + ["--out", str(out), stages, "pretrain.n_samples=0"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "sft" / "summary.json").read_text())
    for key in [*FIGURES, *(f"base_{k}" for k in FIGURES), "seconds", "device", "examples"]:
        assert key in summary, key
    assert len(summary["dropped_too_long_where"]) == min(summary["dropped_too_long"], 20)
    assert summary["train_loss"] < 0.6 * summary["first_loss"]
    assert summary["end_token_rate"] > summary["base_end_token_rate"] + 0.2
    for name in ("model.safetensors", "model.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / "sft" / name).exists(), name
