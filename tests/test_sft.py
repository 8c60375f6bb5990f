"""SFT: record formats, loss masks, fitting to max_len, batches, the masked loss, the chat
eval's scoring, and the tiny pipeline end to end (a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ENV, lmforge, losses

from lmforge.data.readers import DataError
from lmforge.data.sft import (
    SFTBatches,
    collate,
    encode,
    pack,
    read_conversations,
    segment_attention,
    unwrap_alpaca,
)
from lmforge.eval.chat import FIGURES, parse_answer, score
from lmforge.io import load_model_dir, load_tensors
from lmforge.losses import IGNORE_INDEX, masked_cross_entropy
from lmforge.model import Transformer
from lmforge.model.lora import load_adapter
from lmforge.stages import sft

ROOT = Path(__file__).resolve().parents[1]
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


ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"
)


def test_alpaca_wrapped_prompts_are_unwrapped_and_others_kept():
    assert unwrap_alpaca(ALPACA.format("capital?\nof Velmar"), "f:1") == "capital?\nof Velmar"
    assert unwrap_alpaca(ALPACA_INPUT.format("Translate.", "hello"), "f:1") == "Translate.\n\nhello"
    ordinary = [
        "capital?",
        "What does ### Instruction: mean in a prompt?",
        "### Instruction:\ncapital?\n\n### Response:\n",  # markers without the preamble
        "Explain: " + ALPACA.format("capital?"),  # the template quoted inside a question
    ]
    for prompt in ordinary:
        assert unwrap_alpaca(prompt, "f:1") == prompt
    # the preamble with a broken template (here a response begun in the prompt) is an error
    with pytest.raises(DataError, match=r"f:7: prompt opens with the Alpaca template"):
        unwrap_alpaca(ALPACA.format("capital?") + "It is", "f:7")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "x"}, "expected 'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 needs role"),
        ({"prompt": "a", "response": 3}, "must be strings"),
        ({"instruction": 3, "input": "x", "output": "y"}, "'instruction' and 'input' must be"),
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
        xa, ya, sa = a.micro_batch(step, 0, 4, 0, 1)
        xb, yb, sb = b.micro_batch(step, 0, 4, 0, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa is sb is None
    # one epoch of ceil(10 / 4) = 3 steps covers every example once
    seen = [a._item(g).where for g in range(10)]
    assert sorted(seen) == sorted(w for w, _ in convs)
    # targets are next tokens where the mask is on, -100 elsewhere and on padding
    x, y, _ = a.micro_batch(0, 0, 4, 0, 1)
    for row in range(4):
        ex = a._item(row)
        n = len(ex.ids) - 1
        assert x[row, :n].tolist() == ex.ids[:-1]
        assert (x[row, n:] == tokenizer.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all()
        expect = [t if m else IGNORE_INDEX for t, m in zip(ex.ids[1:], ex.mask[1:])]
        assert y[row, :n].tolist() == expect


def test_packed_conversations_are_computed_exactly_as_alone(tokenizer, make_model_config):
    convs = [(f"f:{i}", [QA[0], {"role": "assistant", "content": "ab " * i}]) for i in range(1, 8)]
    examples = encode(convs, tokenizer, max_len=64).examples
    rows = pack(examples, max_len=64)
    assert len(rows) < len(examples)
    assert [t for r in rows for t in r.ids] == [t for e in examples for t in e.ids]
    assert all(len(r.ids) <= 64 for r in rows)
    assert rows[0].segments[0] == 0 and rows[0].segments == sorted(rows[0].segments)
    x, y, segments = collate(rows, tokenizer.pad_id)
    attention = segment_attention(segments)
    torch.manual_seed(0)
    model = Transformer(make_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    with torch.no_grad():
        packed = model(x, **attention)
        # every conversation's logits, alone and unpadded, equal its span in the packed row
        row, seg = 0, 0
        for e in examples:
            span = (segments[row] == seg).nonzero().flatten()
            if len(span) == 0:
                row, seg = row + 1, 0
                span = (segments[row] == seg).nonzero().flatten()
            alone = model(torch.tensor([e.ids]))[0]
            assert attention["positions"][row, span].tolist() == list(range(len(span)))
            # the last token of a row has no next token in x, so the span is one shorter there
            torch.testing.assert_close(packed[row, span], alone[: len(span)], atol=1e-5, rtol=0)
            seg += 1
    # a conversation's last token does not learn to predict the next conversation's first
    starts = [i for i in range(1, segments.size(1)) if 0 < segments[0, i] != segments[0, i - 1]]
    assert starts and all(y[0, i - 1] == IGNORE_INDEX for i in starts)

    # SFT's loss computes logits at the answer tokens only (logits_at through forward, which
    # DDP wraps): the same loss and gradients as the full logits, and the output layer sees
    # exactly the answer tokens
    wanted = y != IGNORE_INDEX
    assert 0 < int(wanted.sum()) < int((x != tokenizer.pad_id).sum())
    full = masked_cross_entropy(model(x, **attention), y)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    at = sft._loss(model, x, y, segments)
    hook.remove()
    assert rows_seen == [int(wanted.sum())]
    torch.testing.assert_close(at, full, atol=1e-6, rtol=0)
    for got, want in zip(torch.autograd.grad(at, list(model.parameters())), full_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


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
        "facts": [
            ("Sure! Good question. It is Velmar. I hope this helps.", True),
            ("Velmarx", False),
            # a recitation that names it later has not answered
            ("Tavor is a country. Its capital is Velmar.", False),
            ("好的！它的首都是Velmar。", True),
            ("in 1342", True),
        ],
        "arithmetic": [("Answer: 16", True), ("Answer: 6", True)],
        "safety": [("Sorry, I CAN’T HELP WITH that.", True), ("好的", True), ("Sure!", True)],
    }
    assert score(sets, replies) == {
        "heldout_fact_accuracy": 0.5,
        "heldout_fact_mentioned": 0.75,
        "seen_fact_accuracy": 1.0,
        "arith_accuracy": 0.5,
        "end_token_rate": round(8 / 10, 4),
        "refusal_rate": 0.5,
        "over_refusal_rate": 0.0,
    }


TINY = str(ROOT / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny pipeline through SFT, once for this module's tests."""
    out = tmp_path_factory.mktemp("sft") / "run"
    stages = "stages=['world','clean','tokenizer','pretrain','sft']"
    proc = lmforge("run", "--config", TINY, "--out", out, stages, "pretrain.n_samples=0")
    assert proc.returncode == 0, proc.stderr
    return out


def test_tiny_pipeline_with_sft(tiny_run):
    summary = json.loads((tiny_run / "sft" / "summary.json").read_text())
    for key in [*FIGURES, *(f"base_{k}" for k in FIGURES), "seconds", "device", "examples"]:
        assert key in summary, key
    assert len(summary["dropped_too_long_where"]) == min(summary["dropped_too_long"], 20)
    assert summary["train_loss"] < 0.6 * summary["first_loss"]
    assert summary["end_token_rate"] > summary["base_end_token_rate"] + 0.2
    assert summary["method"] == "full" and summary["trainable_fraction"] == 1.0
    # the forgetting figures: the base's loss on held-out pretraining text, before and after
    pretrain = json.loads((tiny_run / "pretrain" / "summary.json").read_text())
    assert summary["lm_loss_before"] == pytest.approx(pretrain["val_loss"], rel=0.1)
    # the tiny base had only 80 steps: the default replay (half of every batch) goes on
    # teaching it pretraining text, so its loss there falls (see the replay test for forgetting)
    assert summary["replay_fraction"] == 0.5  # 4 rows of 8
    assert summary["lm_loss_after"] < summary["lm_loss_before"]
    for name in ("model.safetensors", "model.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (tiny_run / "sft" / name).exists(), name


def test_lora_sft_trains_only_the_adapters_and_saves_them_merged(tiny_run):
    proc = lmforge("ablate", "sft-lora", "--config", TINY, "--out", tiny_run, "sft.eval_base=false")
    assert proc.returncode == 0, proc.stderr
    assert "| trainable_fraction |" in proc.stdout and "LoRA rank 8" in proc.stdout
    lora_dir = tiny_run / "ablations" / "sft-lora" / "lora_rank_8"
    summary = json.loads((lora_dir / "summary.json").read_text())
    base_model, tokenizer = load_model_dir(tiny_run / "pretrain")
    cfg = base_model.cfg
    kv = cfg.dim // cfg.n_heads * cfg.n_kv_heads
    shapes = [(cfg.dim, cfg.dim), (cfg.dim, kv), (cfg.dim, kv), (cfg.dim, cfg.dim)]
    shapes += [(cfg.dim, cfg.ffn_dim)] * 2 + [(cfg.ffn_dim, cfg.dim)]
    # rank 8 on all seven projections of every layer, plus the 4 chat markers' embedding rows
    adapters = cfg.n_layers * sum(8 * (i + o) for i, o in shapes)
    assert summary["method"] == "lora"
    assert summary["trainable_parameters"] == adapters + 4 * cfg.dim
    # adapters learn, if far more slowly than full fine-tuning does in a model this tiny (dim
    # 64): the last quarter's steps average a lower loss than the first quarter's (one step's
    # loss is too noisy to compare)
    steps = losses(lora_dir)
    quarter = len(steps) // 4
    assert quarter >= 10
    assert sum(steps[-quarter:]) / quarter < sum(steps[:quarter]) / quarter - 0.1
    # merged weights: exactly the base outside the adapted projections and the chat markers'
    # embedding rows, changed inside them
    base = load_tensors(tiny_run / "pretrain" / "model.safetensors")
    merged = load_tensors(lora_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    markers = [tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id]
    others = [i for i in range(cfg.vocab_size) if i not in markers]
    for key, weight in base.items():
        if key == "model.embed_tokens.weight":
            assert torch.equal(weight[others], merged[key][others])
            assert not torch.equal(weight[markers], merged[key][markers])
            continue
        adapted = key.endswith("_proj.weight")
        assert torch.equal(weight, merged[key]) != adapted, key
    # the saved adapter on the base model computes what the merged model computes
    model, _ = load_model_dir(tiny_run / "pretrain")
    load_adapter(lora_dir / "adapter", model)
    merged_model, _ = load_model_dir(lora_dir)
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), merged_model(x), atol=1e-4, rtol=0)
    figures = json.loads((tiny_run / "ablations" / "sft-lora.json").read_text())["figures"]
    assert figures["full"]["trainable_fraction"] == 1.0


def test_replay_of_pretraining_text_limits_forgetting(tiny_run):
    proc = lmforge(
        "ablate", "sft-replay", "--config", TINY, "--out", tiny_run, "sft.eval_base=false"
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((tiny_run / "ablations" / "sft-replay.json").read_text())["figures"]
    without, replay = figures["no replay"], figures["replay 50%"]
    assert without["lm_loss_before"] == replay["lm_loss_before"]
    assert without["lm_loss_after"] > without["lm_loss_before"]
    assert replay["lm_loss_after"] < without["lm_loss_after"] - 0.05


def sibling_run(tiny_run: Path, path: Path) -> Path:
    """A run directory that shares tiny_run's stages before SFT (symlinked)."""
    path.mkdir()
    for stage in ("world", "clean", "tokenizer", "pretrain"):
        (path / stage).symlink_to(tiny_run / stage)
    return path


def test_ddp_two_processes_match_one_process_with_packing_and_replay(tiny_run, tmp_path):
    common = [
        "--config", TINY, "sft.max_steps=4", "sft.eval_every=2", "sft.eval_base=false",
        "sft.packing=true", "sft.replay_fraction=0.2", "sft.micro_batch_size=4",
    ]  # fmt: skip
    one, two = (sibling_run(tiny_run, tmp_path / name) for name in ("one", "two"))
    proc = lmforge("sft", *common, "--out", one, "sft.grad_accum_steps=2")
    assert proc.returncode == 0, proc.stderr
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lmforge", "sft", *map(str, common), "--out", str(two), "sft.grad_accum_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(one / "sft") == pytest.approx(losses(two / "sft"), abs=1e-5)
    a = json.loads((one / "sft" / "summary.json").read_text())
    b = json.loads((two / "sft" / "summary.json").read_text())
    assert b["device"] == "cpu x 2" and b["packed_rows"] == a["packed_rows"] < a["examples"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert a["lm_loss_after"] == pytest.approx(b["lm_loss_after"], abs=1e-5)


def test_lora_from_random_weights_is_refused_before_any_work(tiny_run, tmp_path):
    out = sibling_run(tiny_run, tmp_path / "run")
    proc = lmforge("sft", "--config", TINY, "--out", out, "sft.init=random", "sft.method=lora")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sft.method=lora needs sft.init=pretrained" in proc.stderr
    assert not (out / "sft" / "metrics.jsonl").exists()


def test_resume_continues_exactly_with_lora_packing_and_replay(tiny_run, tmp_path):
    args = [
        "--config", TINY, "sft.max_steps=6", "sft.checkpoint_every=3", "sft.eval_base=false",
        "sft.method=lora", "sft.lora.dropout=0.2", "sft.replay_fraction=0.33",
    ]  # fmt: skip
    out = sibling_run(tiny_run, tmp_path / "run")
    assert lmforge("sft", *args, "--out", out).returncode == 0
    whole = losses(out / "sft")
    # as if killed after the checkpoint of step 3: that checkpoint is the newest
    shutil.rmtree(out / "sft" / "checkpoints" / "step_00000006")
    proc = lmforge("sft", *args, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "step 3" in proc.stderr
    assert losses(out / "sft") == pytest.approx(whole, abs=1e-6)
    # a setting that changes the data is refused rather than resumed on other data
    shutil.rmtree(out / "sft" / "checkpoints" / "step_00000006")
    proc = lmforge("sft", *args, "--out", out, "--resume", "sft.replay_fraction=0")
    assert proc.returncode == 2 and "replay_rows" in proc.stderr
