"""Config: defaults, TOML files, key=value overrides, error messages and the TOML round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.config import (
    ConfigError,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    apply_overrides,
    load_config,
    to_toml,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_validate_and_have_documented_values():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.stages == ["world", "clean", "tokenizer", "pretrain", "sft", "rm", "dpo", "grpo"]
    assert cfg.seed == 0
    assert cfg.pretrain.lr == 3e-3
    assert cfg.pretrain.dtype == "auto"
    assert cfg.model.vocab_size == 0  # taken from the tokenizer
    assert cfg.model.tie_embeddings is True
    assert cfg.world.languages == ["en", "zh"]
    assert cfg.tokenizer.corpus is None


@pytest.mark.parametrize("name", ["tiny", "gpu", "arithmetic"])
def test_the_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg != RunConfig()
    if name == "arithmetic":
        assert (cfg.world.arithmetic_steps, cfg.world.n_arithmetic) == ("small", 2000)
        # 560 s of training leaves the held-out evaluations room within 10 minutes
        assert cfg.stages[-1] == "grpo" and cfg.grpo.time_limit == 560
        # rollouts cut at 64 tokens, the held-out accuracy measured as SFT's
        assert (cfg.grpo.max_new_tokens, cfg.grpo.eval_max_new_tokens) == (64, 96)
        assert cfg.grpo.eval_max_new_tokens == cfg.sft.eval_max_new_tokens
    assert RunConfig().world.arithmetic_steps == "whole"


def test_file_then_overrides_land_in_the_right_place(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'stages = ["world", "tokenizer"]\n'
        "[pretrain]\nlr = 0.01\nmax_steps = 10\n"
        "[model]\ndim = 64\nn_heads = 4\n",
        encoding="utf-8",
    )
    cfg = load_config(
        path,
        [
            "pretrain.lr=1e-3",  # beats the file
            "world.languages=['zh']",
            'pretrain.device="cpu"',
            "pretrain.dtype=bfloat16",  # bare string
            "model.tie_embeddings=false",
            "pretrain.compile=true",
            "tokenizer.corpus=data/corpus.jsonl",
            "seed=7",
            "model.norm_eps = 1e-6",  # spaces around '=' are allowed
        ],
    )
    assert cfg.pretrain.lr == 1e-3
    assert cfg.pretrain.max_steps == 10  # from the file, untouched by overrides
    assert cfg.model.dim == 64 and cfg.model.n_heads == 4
    assert cfg.stages == ["world", "tokenizer"]
    assert cfg.world.languages == ["zh"]
    assert cfg.pretrain.device == "cpu"
    assert cfg.pretrain.dtype == "bfloat16"
    assert cfg.model.tie_embeddings is False
    assert cfg.pretrain.compile is True
    assert cfg.tokenizer.corpus == "data/corpus.jsonl"
    assert cfg.seed == 7
    assert cfg.model.norm_eps == 1e-6
    # everything else keeps its default
    assert cfg.pretrain.warmup_steps == PretrainConfig().warmup_steps
    assert cfg.model.n_kv_heads == ModelConfig().n_kv_heads


def test_overrides_do_not_mutate_their_input():
    data = {"pretrain": {"lr": 0.1}, "seed": 1}
    out = apply_overrides(data, ["pretrain.lr=0.2", "pretrain.max_steps=5", "seed=2"])
    assert data == {"pretrain": {"lr": 0.1}, "seed": 1}
    assert out == {"pretrain": {"lr": 0.2, "max_steps": 5}, "seed": 2}


def test_numeric_looking_value_for_a_string_field_is_kept_as_string():
    # "key=value: a TOML value, else the bare string" -- a corpus file named 2024 is a path
    cfg = load_config(overrides=["tokenizer.corpus=2024"])
    assert cfg.tokenizer.corpus == "2024"


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("pretrain.lr=-1", "pretrain.lr", "0 < value"),
        ("pretrain.lr=2", "pretrain.lr", "value <= 1"),
        ("model.n_layers=0", "model.n_layers", "1 <= value <= 1024"),
        ("pretrain.beta1=1.0", "pretrain.beta1", "value < 1"),
        ("world.noise_fraction=0.95", "world.noise_fraction", "value <= 0.9"),
        ("pretrain.dtype=fp8", "pretrain.dtype", "'bfloat16'"),
        ("pretrain.device=tpu", "pretrain.device", "'cuda'"),
    ],
)
def test_invalid_value_names_key_and_allowed_range(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    # the key starts its own line of the message, and the same line gives the limits
    line = next(ln for ln in msg.splitlines() if ln.strip().startswith(key + ":"))
    assert allowed in line
    got = override.split("=", 1)[1]
    assert f"got {got!r}" in line or f"got {got}" in line


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["pretrain.lr=-1", "model.n_layers=0", "pretrain.dtype=fp8"])
    msg = str(info.value)
    for key in ("pretrain.lr", "model.n_layers", "pretrain.dtype"):
        assert re.search(rf"^\s+{re.escape(key)}:", msg, re.M), msg


def test_invalid_list_item_names_its_index():
    with pytest.raises(ConfigError, match=r"world\.languages\.0"):
        load_config(overrides=["world.languages=['fr']"])


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"pretrain\.learning_rate"):
        load_config(overrides=["pretrain.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"nosuchsection"):
        load_config(overrides=["nosuchsection.x=1"])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad_key.toml"
    path.write_text("[model]\ndims = 64\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.dims" in str(info.value)
    assert str(path) in str(info.value)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[pretrain\nlr = 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


@pytest.mark.parametrize("item", ["pretrain.lr", "=3", "  =x"])
def test_malformed_override_raises(item):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=[item])


def test_override_into_a_non_section_raises():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_defaults_are_not_shared_between_configs():
    a = load_config()
    a.pretrain.lr = 0.5
    a.world.languages.append("en")
    b = load_config()
    assert b.pretrain.lr == 3e-3
    assert b.world.languages == ["en", "zh"]
    assert RunConfig().pretrain.lr == 3e-3


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(ValueError):
        cfg.pretrain.lr = -1.0


def _round_trip(cfg: RunConfig, tmp_path) -> RunConfig:
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return load_config(path)


def test_to_toml_round_trips_defaults(tmp_path):
    assert _round_trip(RunConfig(), tmp_path) == RunConfig()


def test_to_toml_round_trips_changed_values(tmp_path):
    cfg = load_config(
        overrides=[
            "stages=['world']",
            "seed=11",
            "world.languages=['zh']",
            "model.vocab_size=321",
            "model.norm_eps=1e-6",
            "model.init_std=0.125",
            "model.tie_embeddings=false",
            "model.qkv_bias=true",
            "pretrain.lr=1e-5",
            "pretrain.grad_clip=inf",
            "pretrain.dtype=float32",
            'tokenizer.corpus="C:\\\\data\\\\my \\"corpus\\".jsonl"',
            "pretrain.probes='中文/探针.jsonl'",
        ]
    )
    assert cfg.tokenizer.corpus == 'C:\\data\\my "corpus".jsonl'
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    assert back.pretrain.probes == "中文/探针.jsonl"
    assert back.pretrain.grad_clip == float("inf")


def test_to_toml_round_trips_strings_with_control_characters(tmp_path):
    cfg = RunConfig()
    cfg.tokenizer.corpus = "line one\nline two\tand a tab"
    assert _round_trip(cfg, tmp_path) == cfg
