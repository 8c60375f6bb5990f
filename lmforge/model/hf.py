"""Hugging Face interop: export an lmforge model directory, import a Llama or Qwen2 checkpoint,
export a LoRA adapter directory as a PEFT adapter.

Parameter names are those of `LlamaForCausalLM` / `Qwen2ForCausalLM` one for one, so both
directions are a config translation plus a copy of the tensors. A model with q/k/v bias is a
Qwen2 (Llama's `attention_bias` also puts a bias on o_proj, which lmforge does not have).

Only safetensors are read: a checkpoint of pickle files (`*.bin`) is refused, never loaded,
since unpickling runs code from the file. An import refuses, naming config.json and the key,
every setting the lmforge Transformer would compute differently (rope scaling, sliding window,
a head_dim other than hidden_size / num_attention_heads, biases, activations), rather than
produce a model that loads but is silently wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import ModelConfig
from lmforge.io import (
    CheckpointError,
    load_model_dir,
    load_model_state,
    load_tensors,
    model_state,
    read_json,
    save_model_dir,
    save_tensors_atomic,
    write_json_atomic,
)
from lmforge.model.lora import ADAPTER_WEIGHTS, TOKEN_ROWS, read_adapter_config
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, TokenizerError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The `config.json` of the Hugging Face twin of `cfg` (special ids from `tokenizer`).

    rope_theta and rope_scaling are written at the top level, which transformers 4 and 5
    both read."""
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        config |= {"attention_bias": False, "mlp_bias": False}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None}
    if tokenizer is not None:
        config |= {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    return config


def export_hf(model_dir: Path, out_dir: Path) -> None:
    """Write `model_dir` (an lmforge model directory) as a Hugging Face model directory that
    `AutoModelForCausalLM` and `AutoTokenizer` load, chat template included."""
    model, tokenizer = load_model_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A LoRA model is exported merged: its adapters are folded into these weights first.
    # model_state leaves out a tied lm_head, as Hugging Face does.
    save_tensors_atomic(model_state(model), out_dir / "model.safetensors", {"format": "pt"})
    write_json_atomic(out_dir / "config.json", hf_config(model.cfg, tokenizer))
    stop_ids = list(dict.fromkeys([tokenizer.eos_id, tokenizer.end_id]))
    write_json_atomic(
        out_dir / "generation_config.json",
        {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": stop_ids,
            "pad_token_id": tokenizer.pad_id,
        },
    )
    tokenizer.hf.save(str(out_dir / "tokenizer.json"))
    write_json_atomic(out_dir / "tokenizer_config.json", tokenizer.hf_config())


def export_peft(
    adapter_dir: Path, out_dir: Path, base_model_name_or_path: str | None = None
) -> None:
    """Write an lmforge adapter directory (`lora.save_adapter`) as a PEFT LoRA adapter:
    `PeftModel.from_pretrained(base, out_dir)` loads it onto the Hugging Face export of its
    base model (`export_hf`).

    The adapter's own `base_model` is an lmforge directory, which transformers cannot load, so
    `base_model_name_or_path` (the exported base's directory or hub name) is what
    adapter_config.json records; without it, it records none and the base is passed by hand.
    PEFT's saved names are lmforge's behind the `base_model.model.` of its wrapper.

    Trained token rows (`lora.train_token_rows`) become PEFT's trainable tokens
    (`LoraConfig.trainable_token_indices`). PEFT saves a matrix's rows as
    `base_model.model.<matrix>.token_adapter.trainable_tokens_delta`: despite the name, the
    rows' full new values, which it writes over the base rows (index_copy), as lmforge saves
    them, so no base weights are needed. A tied model has embedding rows only, which PEFT's
    list form of the indices puts on the embedding and on the lm_head tied to it; an untied
    one has lm_head rows too, and the dict form names both matrices. Where the adapter's base
    model directory is at hand, its tie_embeddings says which of the two the rows must be.
    """
    cfg, base_model, token_ids = read_adapter_config(adapter_dir)
    path = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_tensors(path)
    rows = {
        k.removesuffix(TOKEN_ROWS): tensors.pop(k) for k in list(tensors) if k.endswith(TOKEN_ROWS)
    }
    tied = _ties_embeddings(Path(base_model)) if token_ids else None
    trainable_token_indices = _trainable_token_indices(path, token_ids, rows, tied)
    peft_tensors = {f"base_model.model.{k}": v for k, v in tensors.items()}
    for name, v in rows.items():
        peft_tensors[f"base_model.model.{name}.token_adapter.trainable_tokens_delta"] = v
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(peft_tensors, out_dir / "adapter_model.safetensors", {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        # scaling alpha / r, plain LoRA: what LoRALinear computes
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "trainable_token_indices": trainable_token_indices,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    write_json_atomic(out_dir / "adapter_config.json", config)


_EMBED, _HEAD = "model.embed_tokens", "lm_head"


def _ties_embeddings(model_dir: Path) -> bool | None:
    """tie_embeddings of the lmforge model directory `model_dir`; None when it cannot be read
    (the base need not be at hand to export an adapter)."""
    try:
        config = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        return ModelConfig.model_validate(config).tie_embeddings
    except (OSError, ValueError):  # missing, not JSON, not a ModelConfig
        return None


def _trainable_token_indices(
    path: Path, token_ids: list[int], rows: dict[str, Any], tied: bool | None
) -> list[int] | dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for the token rows `rows` (matrix name -> rows) that
    `path` holds for adapter.json's `token_ids`, on a base model whose embeddings are `tied`
    (None: unknown); None without any rows. A misfit is refused, naming `path`: PEFT would
    load it as a wrong model or not at all."""
    if not token_ids and not rows:
        return None
    found = sorted(name + TOKEN_ROWS for name in rows)
    if not token_ids:
        raise CheckpointError(f"{path}: has token rows {found} but adapter.json has no token_ids")
    fits = [{_EMBED}, {_EMBED, _HEAD}] if tied is None else [{_EMBED} if tied else {_EMBED, _HEAD}]
    if set(rows) not in fits:
        expected = " and ".join(sorted(name + TOKEN_ROWS for name in fits[-1]))
        which = {None: "", True: " (tied embeddings)", False: " (untied lm_head)"}[tied]
        raise CheckpointError(
            f"{path}: adapter.json has token_ids but the file has token rows {found}; "
            f"expected {expected}{which}"
        )
    for name, v in rows.items():
        if v.ndim != 2 or v.shape[0] != len(token_ids) or v.shape[1] != rows[_EMBED].shape[1]:
            raise CheckpointError(
                f"{path}: {name}{TOKEN_ROWS} has shape {tuple(v.shape)}, expected "
                f"({len(token_ids)}, dim) for {len(token_ids)} token_ids"
            )
    if _HEAD in rows:
        return {"embed_tokens": list(token_ids), "lm_head": list(token_ids)}
    return list(token_ids)


def _unsupported(path: Path, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {key} = {json.dumps(value)} is not supported ({why})")


def model_config_from_hf(config: dict[str, Any], path: Path) -> ModelConfig:
    """The ModelConfig of a Llama or Qwen2 `config.json` (read from `path`, named in errors)."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _unsupported(path, "architectures", archs, f"supported: {list(ARCHITECTURES)}")
    arch = archs[0]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        raise CheckpointError(f"{path}: hidden_size and num_attention_heads must be integers")
    rope = config.get("rope_parameters") or {}
    checks = [
        ("rope_scaling", config.get("rope_scaling"), None, "lmforge has plain RoPE"),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default", "plain RoPE"),
        ("use_sliding_window", config.get("use_sliding_window", False), False, "full attention"),
        ("head_dim", config.get("head_dim") or hidden // heads, hidden // heads, "hidden / heads"),
        ("hidden_act", config.get("hidden_act", "silu"), "silu", "SwiGLU with SiLU"),
        ("mlp_bias", config.get("mlp_bias", False), False, "no MLP bias"),
    ]
    if arch == "LlamaForCausalLM":  # a Llama attention bias is on o_proj too
        checks.append(("attention_bias", config.get("attention_bias", False), False, "no bias"))
    for key, value, expected, why in checks:
        if value != expected:
            raise _unsupported(path, key, value, f"lmforge needs {json.dumps(expected)}: {why}")
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _unsupported(path, "layer_types", layer_types, "only full_attention layers")
    try:
        return ModelConfig(
            vocab_size=config["vocab_size"],
            dim=hidden,
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            ffn_dim=config["intermediate_size"],
            max_seq_len=config["max_position_embeddings"],
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10_000.0)),
            norm_eps=config["rms_norm_eps"],
            tie_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            init_std=config.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except ValidationError as e:
        raise CheckpointError(f"{path}: values lmforge cannot take: {e}") from None


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards its index lists)."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{hf_dir}: only safetensors weights are supported; {pickles[0]} is a pickle file, "
            "which lmforge never loads (convert it to model.safetensors first)"
        )
    raise CheckpointError(f"{single}: file is missing (no safetensors weights in {hf_dir})")


def _load_tokenizer(hf_dir: Path) -> Tokenizer:
    """tokenizer.json with its special tokens and chat template, wherever transformers keeps
    them (special_tokens_map.json, tokenizer_config.json, chat_template.jinja)."""
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(
            f"{path}: file is missing (lmforge needs a fast tokenizer's tokenizer.json)"
        )
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (hf_dir / name).exists():
            try:
                config |= json.loads((hf_dir / name).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{hf_dir / name}: not valid JSON ({e})") from None
    if (hf_dir / "chat_template.jinja").exists():
        config["chat_template"] = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        return Tokenizer(HFTokenizer.from_file(str(path)), config)
    except TokenizerError as e:
        raise CheckpointError(f"{hf_dir}: {e}") from None
    except Exception as e:  # the Rust error is opaque: name the file
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None


def _download(name: str) -> Path:
    """A hub model's config, tokenizer and safetensors files, through huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name}: no such directory; downloading from the Hugging Face Hub needs "
            "huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        files = ["*.json", "*.safetensors", "*.jinja"]
        return Path(snapshot_download(name, allow_patterns=files))
    except Exception as e:  # offline, unknown repository, gated model, ...
        raise CheckpointError(
            f"{name}: could not download it from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "check the network and the name, or download the model and pass its directory"
        ) from None


def import_hf(source: str | Path, out_dir: Path) -> ModelConfig:
    """Write an lmforge model directory from a Llama or Qwen2 Hugging Face checkpoint: a
    local directory, or a hub name (`owner/model`) when huggingface_hub can download it.

    The imported tokenizer keeps its own special ids and chat template, which SFT and the
    chat evaluation render with (see `Tokenizer`)."""
    hf_dir = Path(source)
    if not hf_dir.is_dir():
        if hf_dir.exists() or not _HUB_NAME.match(str(source)):
            raise CheckpointError(f"{source}: no such directory")
        hf_dir = _download(str(source))
    config_path = hf_dir / "config.json"
    config = read_json(config_path, f"is {hf_dir} a Hugging Face model directory?")
    cfg = model_config_from_hf(config, config_path)
    weight_files = _weight_files(hf_dir)
    tokenizer = _load_tokenizer(hf_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{hf_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json "
            f"vocab_size is {cfg.vocab_size}"
        )
    tensors = {}
    for path in weight_files:
        tensors |= load_tensors(path)
    # older checkpoints store RoPE's inverse frequencies, which lmforge recomputes; a tied
    # checkpoint may store lm_head as well as the embedding it shares
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = Transformer(cfg)
    load_model_state(model, tensors, hf_dir)
    save_model_dir(out_dir, model, tokenizer)
    return cfg
