"""Shared small fixtures: a tokenizer trained once per session and tiny model configs; and
for the Hugging Face tests, tiny transformers models and tokenizers with specials and chat
templates of their own."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers, trainers

from lmforge.config import ModelConfig, WorldConfig
from lmforge.io import save_model_dir
from lmforge.model import Transformer, native
from lmforge.tokenizer import Tokenizer, build_untrained, train_tokenizer
from lmforge.world import build_world

_EN_TEXT = (
    "the quick brown fox jumps over a lazy dog while capital city river mountain "
    "people live in small towns and eat rice bread fish every day it is sunny today"
)
_EN_WORDS = _EN_TEXT.split()
_ZH_PHRASES = [
    "你好",
    "世界",
    "今天",
    "天气",
    "很好",
    "中国",
    "首都",
    "北京",
    "我们",
    "学习",
    "语言",
    "模型",
]
_EMOJI = ["😀", "👍", "👍🏽", "🎉", "❤️", "👨‍👩‍👧", "🇨🇳", "🚀"]


def corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    """Short deterministic lines of English, Chinese, digits and emoji."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        en = " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 8)))
        zh = "".join(rng.choice(_ZH_PHRASES) for _ in range(rng.randint(2, 5)))
        emoji = "".join(rng.choice(_EMOJI) for _ in range(rng.randint(0, 2)))
        kind = i % 3
        if kind == 0:
            lines.append(f"{en} {rng.randint(0, 9999)} {emoji}")
        elif kind == 1:
            lines.append(f"{zh}，{zh}。{emoji}")
        else:
            lines.append(
                f"{en.capitalize()}: {zh} {emoji} {rng.randint(0, 99)}+{rng.randint(0, 99)}"
            )
    return lines


# the command line as a user runs it, one thread per process (the tests share a few cores)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def lmforge(*args) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS` in a subprocess, its output captured."""
    cmd = [sys.executable, "-m", "lmforge", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV)


def train_rm_on_feedback(export_dir: Path, model_dir: Path, run_dir: Path) -> dict:
    """`lmforge rm` on what `lmforge feedback export` wrote, as a user runs it (the tiny
    config, starting from `model_dir`); the stage's summary."""
    proc = lmforge(
        "rm",
        "--config",
        TINY,
        "--out",
        run_dir,
        f"rm.data={export_dir / 'comparisons.jsonl'}",
        f"rm.model={model_dir}",
        "rm.best_of_prompts=0",
        "rm.policy_samples=0",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "rm" / "summary.json").read_text())


def torchrun_command(n: int, *args) -> list[str]:
    """`torchrun --nproc_per_node N -m lmforge ARGS`, as a user runs it on one machine."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [sys.executable, *launcher, "-m", "lmforge", *map(str, args)]


def torchrun_stage(
    stage: str,
    args: list,
    n: int,
    tiny_run: Path,
    out: Path,
    inputs: Sequence[str] = ("world", "tokenizer", "pretrain", "sft"),
) -> list[str]:
    """`torchrun_command(N, STAGE, *ARGS, "--out", OUT)` on the tiny run's `inputs` (linked
    into OUT: by default its world, tokenizer, pretrained and SFT models), asserting that it
    succeeded; returns the command."""
    out.mkdir()
    for earlier in inputs:
        (out / earlier).symlink_to(tiny_run / earlier)
    cmd = torchrun_command(n, stage, *args, "--out", out)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cmd


def losses(stage_dir: Path) -> list[float]:
    """The training losses a stage logged, step by step."""
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="session")
def world():
    """The default-config world (entities and facts), built once for every test module."""
    return build_world(WorldConfig())


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE of ~400 ids trained on `corpus_lines()`."""
    return train_tokenizer(corpus_lines(), vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session")
def make_model_config():
    """A factory of tiny ModelConfigs: dim 32, 2 layers, 4 heads over 2 kv heads, vocab 300."""

    def make(**overrides) -> ModelConfig:
        values = dict(
            vocab_size=300,
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=64,
            max_seq_len=64,
            rope_theta=10_000.0,
            tie_embeddings=True,
        )
        values.update(overrides)
        return ModelConfig(**values)

    return make


@pytest.fixture(scope="session")
def make_model(make_model_config):
    """A factory of tiny Transformers in eval mode, seeded for reproducibility."""

    def make(seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(make_model_config(**overrides)).eval()

    return make


@contextlib.contextmanager
def rows_per_call(model: Transformer) -> Iterator[list[int]]:
    """Within this block, a list of the rows of every model call of a generation (the
    prefill, then each decoding step, whichever step computes it: PyTorch's or the C++ one)."""
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    step = native.NativeStep.__call__

    def counted(self, tokens, *args):
        rows.append(len(tokens))
        return step(self, tokens, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native.NativeStep, "__call__", counted)
        try:
            yield rows
        finally:
            hook.remove()


@pytest.fixture
def count_rows():
    """`with count_rows(model) as rows:` rows gets the rows of each model call (see
    rows_per_call)."""
    return rows_per_call


@pytest.fixture(scope="session")
def served_model(tmp_path_factory, tokenizer, make_model) -> Path:
    """A tiny random chat model directory (the session tokenizer), for the server's tests."""
    directory = tmp_path_factory.mktemp("model") / "served"  # served under the name "served"
    model = make_model(vocab_size=tokenizer.vocab_size, max_seq_len=256)
    save_model_dir(directory, model, tokenizer)
    return directory


# ---- Hugging Face (callers skip without transformers) -------------------------------------
# Qwen2-Instruct's chat template (ChatML, with a default system message)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def own_specials_tokenizer(
    extra_specials: Sequence[str] = (), chat_template: str | None = None, **special_tokens: str
):
    """A byte-level BPE (every byte, ~100 merges of `corpus_lines()`) whose specials are not
    lmforge's, wrapped as transformers would save it: `special_tokens` (bos_token="<s>", ...)
    and `extra_specials` are added after the vocabulary, in that order."""
    import transformers

    hf = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(corpus_lines(), trainer=trainer)
    hf.add_special_tokens(list(dict.fromkeys([*special_tokens.values(), *extra_specials])))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, chat_template=chat_template, **special_tokens
    )


def make_hf_model(arch: str, vocab_size: int, tie: bool, n_kv_heads: int, seed: int = 0):
    """A small random HF Llama or Qwen2 (q/k/v bias); every weight (norms and biases too)
    drawn at random."""
    import transformers

    config_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    model_cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p)
            )
    return model


def forward_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """The logits of an lmforge or a transformers model."""
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def hf_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or (transformers 5) a BatchEncoding."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    return list(result)


TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """`lmforge run --config configs/tiny.toml` (the default stages, through reward model,
    DPO and GRPO), then `lmforge kto` and `lmforge ppo`, run once as a user runs them, for every test module
    that reads a stage's output; each command's output is kept in ../<command>.stdout."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    for command in ("run", "kto", "ppo"):
        proc = lmforge(command, "--config", TINY, "--out", out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # what the command printed, beside the run directory, for tests of the output
        (out.parent / f"{command}.stdout").write_text(proc.stdout)
    return out
