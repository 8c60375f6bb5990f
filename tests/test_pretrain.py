"""End-to-end: the tiny pipeline, resume after SIGKILL, DDP with 2 processes, and the CLI's
failure paths. Each training run here is a subprocess of `python -m lmforge`, as a user runs it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def lmforge(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=ENV, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """World and tokenizer of the tiny config, made once for this module."""
    out = tmp_path_factory.mktemp("base")
    run_pipeline(load_config(TINY, ["stages=['world', 'tokenizer']"]), out)
    return out


def inputs(base: Path) -> list[str]:
    return [
        f"pretrain.corpus={base / 'world' / 'corpus.jsonl'}",
        f"pretrain.tokenizer={base / 'tokenizer' / 'tokenizer.json'}",
        f"pretrain.probes={base / 'world' / 'probes.jsonl'}",
        "pretrain.num_threads=1",
    ]


def losses(run: Path) -> list[float]:
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_tiny_pipeline_writes_every_record(tiny_run):
    out = tiny_run
    stages = ["world", "clean", "tokenizer", "pretrain", "sft", "rm", "dpo", "grpo"]
    assert load_config(TINY).stages == stages
    for stage in stages:
        assert (out / stage / "summary.json").exists(), stage
        assert (out / stage / "config.toml").exists(), stage
        assert "seconds" in json.loads((out / stage / "summary.json").read_text())
    resolved = load_config(out / "config.toml")
    assert resolved == load_config(TINY)
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    for key in ("fact_accuracy_en", "fact_accuracy_zh", "val_loss", "seconds", "device"):
        assert key in summary, key
    assert 0.0 <= summary["fact_accuracy_en"] <= 1.0
    assert summary["device"] == "cpu x 1"
    tok = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert tok["vocab_size"] == 512 and tok["chars_per_token_en"] > 1.5
    assert tok["corpus"] == str(out / "clean" / "corpus")  # the cleaned corpus is used
    assert (out / "clean" / "DATA_CARD.md").exists()
    # the model learned something: validation loss well below the uniform ln(512) = 6.24
    assert summary["val_loss"] < 5.0
    rec = losses(out)
    assert len(rec) == 80 and rec[-1] < rec[0] - 1.5
    assert (out / "pretrain" / "loss.png").stat().st_size > 5000
    assert (out / "pretrain" / "model.safetensors").exists()
    assert "fact_accuracy_en" in (out.parent / "run.stdout").read_text()
    gen = lmforge(
        "generate", "--model", str(out / "pretrain"), "--max-tokens", "5", "The capital of"
    )
    assert gen.stdout.startswith("The capital of")
    chat = lmforge("chat", "--model", str(out / "pretrain"), "--max-tokens", "4", input="hello\n\n")
    assert chat.stdout.count("model>") == 1


def test_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = lmforge("run", "--out", str(out), "pretrain.lr=-1", "model.n_layers=0", check=False)
    assert proc.returncode == 2
    assert "pretrain.lr" in proc.stderr and "0 < value" in proc.stderr
    assert "model.n_layers" in proc.stderr and "1 <= value" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    proc = lmforge("run", "--out", str(out), "pretrain.no_such_key=3", check=False)
    assert proc.returncode == 2 and "pretrain.no_such_key" in proc.stderr


def test_resume_after_sigkill_matches_uninterrupted_run(base, tmp_path):
    args = [*inputs(base), "pretrain.max_steps=120", "pretrain.checkpoint_every=20"]
    full = tmp_path / "full"
    lmforge("pretrain", "--config", str(TINY), "--out", str(full), *args)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(TINY), "--out", str(killed)]
    proc = subprocess.Popen(
        [*cmd, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = killed / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step_00000040").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "pretrain" / "summary.json").exists(), "the run ended before the kill"
    lmforge("pretrain", "--config", str(TINY), "--out", str(killed), "--resume", *args)

    a = json.loads((full / "pretrain" / "summary.json").read_text())
    b = json.loads((killed / "pretrain" / "summary.json").read_text())
    assert math.isclose(a["train_loss"], b["train_loss"], abs_tol=1e-5)
    assert math.isclose(a["val_loss"], b["val_loss"], abs_tol=1e-5)
    # the resumed run's steps continue the uninterrupted run's, loss for loss
    resumed = losses(killed)
    assert len(resumed) == 120  # the steps redone after the checkpoint are recorded once
    assert resumed == pytest.approx(losses(full), abs=1e-5)
    assert len(list(ckpts.glob("step_*"))) == 2  # keep_last


def test_corrupted_checkpoint_gives_clear_error(base, tmp_path):
    out = tmp_path / "run"
    args = [*inputs(base), "pretrain.max_steps=20", "pretrain.checkpoint_every=10"]
    lmforge("pretrain", "--config", str(TINY), "--out", str(out), *args)
    weights = out / "pretrain" / "checkpoints" / "step_00000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = lmforge(
        "pretrain", "--config", str(TINY), "--out", str(out), "--resume", *args, check=False
    )
    assert proc.returncode == 2
    assert str(weights) in proc.stderr and "Traceback" not in proc.stderr


def test_ddp_two_processes_match_one_process(base, tmp_path):
    common = [*inputs(base), "pretrain.max_steps=6", "pretrain.eval_every=3"]
    one = tmp_path / "one"
    lmforge(
        "pretrain", "--config", str(TINY), "--out", str(one), *common,
        "pretrain.micro_batch_size=4", "pretrain.grad_accum_steps=2",
    )  # fmt: skip
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lmforge", "pretrain", "--config", str(TINY), "--out", str(two), *common,
        "pretrain.micro_batch_size=4", "pretrain.grad_accum_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    a = json.loads((one / "pretrain" / "summary.json").read_text())
    b = json.loads((two / "pretrain" / "summary.json").read_text())
    assert b["device"] == "cpu x 2"
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_clean_with_a_tokenizer_writes_token_shards_that_pretrain_uses(base, tmp_path):
    tokenizer = base / "tokenizer" / "tokenizer.json"
    out = tmp_path / "run"
    clean = [f"clean.inputs=['{base / 'world' / 'corpus.jsonl'}']", f"clean.tokenizer={tokenizer}"]
    lmforge("clean", "--config", str(TINY), "--out", str(out), *clean)
    summary = json.loads((out / "clean" / "summary.json").read_text())
    meta = json.loads((out / "clean" / "tokens" / "meta.json").read_text())
    assert summary["train_tokens"] == meta["train_tokens"] > 10_000
    lmforge(
        "pretrain", "--config", str(TINY), "--out", str(out), f"pretrain.tokenizer={tokenizer}",
        "pretrain.max_steps=5", "pretrain.num_threads=1",
    )  # fmt: skip
    result = json.loads((out / "pretrain" / "summary.json").read_text())
    assert result["token_shards"] == str(out / "clean" / "tokens")
    assert not (out / "pretrain" / "data").exists()
    # shards made another way (here: another validation split) are not reused
    lmforge(
        "pretrain", "--config", str(TINY), "--out", str(out), "pretrain.max_steps=5",
        f"pretrain.corpus={out / 'clean' / 'corpus'}", "pretrain.num_threads=1",
        f"pretrain.tokenizer={base / 'tokenizer' / 'tokenizer.json'}", "pretrain.val_fraction=0.1",
    )  # fmt: skip
    result = json.loads((out / "pretrain" / "summary.json").read_text())
    assert result["token_shards"] == str(out / "pretrain" / "data")
