"""Configuration: pydantic models, TOML files and `key=value` overrides.

A config is data. `RunConfig` holds one section per stage; a TOML file sets only what it
changes, and `key=value` overrides on the command line (`pretrain.lr=1e-3`) are applied last.
Every value is validated before any work starts, and an invalid one fails with a message
that names the key and the allowed range.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorldConfig(Section):
    """The built-in synthetic world (see WORLD.md); sizes are per language."""

    seed: int = Field(0, ge=0)
    languages: list[Literal["en", "zh"]] = ["en", "zh"]
    n_countries: int = Field(40, ge=1, le=1000)
    n_people: int = Field(80, ge=0, le=10_000)
    fact_docs_per_country: int = Field(12, ge=1, le=1000)
    n_stories: int = Field(600, ge=0, le=1_000_000)
    n_arithmetic: int = Field(600, ge=0, le=1_000_000)
    n_eval_arithmetic: int = Field(200, ge=0, le=100_000)
    noise_fraction: float = Field(0.12, ge=0.0, le=0.9)
    ad_copies: int = Field(2000, ge=0, le=1_000_000)
    heldout_docs: int = Field(200, ge=0, le=100_000)


class TokenizerConfig(Section):
    """Byte-level BPE trained with HF `tokenizers`."""

    corpus: str | None = None  # default: the world's (or the cleaned) corpus of this run
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1, le=1_000_000)
    max_train_chars: int = Field(20_000_000, ge=1000)


class ModelConfig(Section):
    """A Llama-style decoder; `vocab_size=0` takes the tokenizer's size."""

    vocab_size: int = Field(0, ge=0, le=1_000_000)
    dim: int = Field(256, ge=8, le=65_536)
    n_layers: int = Field(4, ge=1, le=1024)
    n_heads: int = Field(8, ge=1, le=1024)
    n_kv_heads: int = Field(4, ge=1, le=1024)
    ffn_dim: int = Field(704, ge=8, le=1_000_000)
    max_seq_len: int = Field(512, ge=8, le=1_048_576)
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, le=0.1)
    tie_embeddings: bool = True
    qkv_bias: bool = False
    init_std: float = Field(0.02, gt=0, le=1.0)


class PretrainConfig(Section):
    """Next-token prediction on token shards."""

    corpus: str | None = None  # default: the cleaned corpus of this run, else the world's
    tokenizer: str | None = None  # default: this run's tokenizer stage
    probes: str | None = None  # default: this run's world fact probes
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5)
    seq_len: int = Field(128, ge=8, le=1_048_576)
    micro_batch_size: int = Field(32, ge=1, le=65_536)
    grad_accum_steps: int = Field(1, ge=1, le=65_536)
    max_steps: int = Field(450, ge=1, le=100_000_000)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    eval_every: int = Field(150, ge=1)
    eval_batches: int = Field(8, ge=1)  # validation size, in global batches
    checkpoint_every: int = Field(150, ge=1)
    keep_last: int = Field(2, ge=1, le=1000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    num_threads: int = Field(0, ge=0, le=4096)  # 0: torch's default


class RunConfig(Section):
    """The whole pipeline: which stages run, and one section per stage."""

    stages: list[Literal["world", "tokenizer", "pretrain"]] = ["world", "tokenizer", "pretrain"]
    seed: int = Field(0, ge=0)
    world: WorldConfig = WorldConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()


def _describe_limits(model: type[BaseModel], loc: tuple) -> str:
    """The allowed range of the field at `loc`, e.g. ' (allowed: 0 < value <= 1)'."""
    field = None
    for name in loc:
        if not isinstance(name, str) or name not in model.model_fields:
            return ""
        field = model.model_fields[name]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    if field is None:
        return ""
    lower = upper = ""
    for m in field.metadata:
        for attr, sign in (("ge", "<="), ("gt", "<")):
            if getattr(m, attr, None) is not None:
                lower = f"{getattr(m, attr)} {sign} "
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                upper = f" {sign} {getattr(m, attr)}"
    return f" (allowed: {lower}value{upper})" if lower or upper else ""


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig, turning pydantic's errors into one message per bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
            lines.append(f"  {key}: {err['msg']}{got}{_describe_limits(RunConfig, err['loc'])}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def _is_text_field(path: list[str]) -> bool:
    """Whether the config key at `path` holds a string (so `corpus=2024` stays "2024")."""
    model: type[BaseModel] = RunConfig
    for name in path[:-1]:
        field = model.model_fields.get(name)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return False
        model = field.annotation
    field = model.model_fields.get(path[-1])
    return field is not None and field.annotation in (str, str | None)


def _parse_value(text: str, as_text: bool) -> Any:
    """A TOML value (`3`, `1e-3`, `true`, `["a", "b"]`), else the bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if as_text and not isinstance(value, str) else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `section.key=value` items into a nested dict (a copy)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.lr=1e-3")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_value(value.strip(), _is_text_field([*parents, leaf]))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML file at `path`, then `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = f"config {path}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with overrides"
    return validate(data, source)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # a JSON string is a valid TOML basic string
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: BaseModel) -> str:
    """The fully resolved config as TOML (keys with value None are left out)."""
    top, sections = [], []
    for key, value in cfg.model_dump().items():
        if isinstance(value, dict):
            body = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            sections.append(f"[{key}]\n" + "\n".join(body))
        elif value is not None:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"
