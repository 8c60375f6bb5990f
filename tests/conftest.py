"""Shared small fixtures: a tokenizer trained once per session and tiny model configs."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

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
