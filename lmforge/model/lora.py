"""LoRA: low-rank adapters on the transformer's linear layers (Hu et al. 2021).

A targeted layer computes

    y = W x + b + (alpha / rank) * B A dropout(x)

with W (out, in) and b frozen, A (rank, in) initialised Kaiming-uniform (a = sqrt(5), as
PEFT and nn.Linear do) and B (out, rank) zero, so an adapted model starts out computing
exactly what the base model does. Only A and B train.

Parameter names follow PEFT's saved adapters: `model.layers.0.self_attn.q_proj.lora_A.weight`
and `...q_proj.lora_B.weight` next to the unchanged base names (`...q_proj.weight`), so a PEFT
export is a rename. `merge_lora` folds W += (alpha / rank) * B A into the base weights and
turns the model back into a plain Transformer with the base model's state-dict keys.

    targets = apply_lora(model, cfg)           # cfg = LoRAConfig(rank=8)
    opt = build_optimizer(model, ...)          # sees only the adapters (requires_grad)
    ...                                         # train
    save_adapter(out / "adapter", model, cfg, str(base_dir))  # adapters only
    merge_lora(model)                           # before export

An adapter directory holds `adapter.safetensors` (the `lora_state_dict`) and `adapter.json`
(the LoRAConfig and the base model it was trained on): `load_adapter` puts it back on that
base, `hf.export_peft` turns it into a PEFT adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from lmforge.config import LoRAConfig
from lmforge.io import (
    CheckpointError,
    load_tensors,
    read_json,
    save_tensors_atomic,
    write_json_atomic,
)
from lmforge.model.transformer import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(Linear):
    """A `Linear` whose frozen weight (and bias) are the base layer's own parameters, plus
    y += (alpha / rank) * B A dropout(x). The base product goes through `Linear.forward`, so
    `Transformer.inference_layout()` (weight_t) applies to it and the adapter term is added
    after it."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # no fresh weight: the base layer's parameters are reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)  # new modules start in train mode; keep the model's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def merged(self) -> Linear:
        """A plain Linear with W + (alpha / rank) * B A (computed in float32)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        weight = (self.weight.detach().float() + delta).to(self.weight.dtype)
        plain = Linear(self.in_features, self.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(weight)
        plain.bias = self.bias
        return plain.train(self.training)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, wrap each targeted `Linear` in a `LoRALinear` (in
    place) and return the wrapped modules' names. Only the adapters' A and B train."""
    bad = sorted(set(cfg.target_modules) - set(TARGETS))
    if bad:
        raise ValueError(f"lora.target_modules: unknown {bad}; choose from {list(TARGETS)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, Linear) and name.rpartition(".")[2] in cfg.target_modules
    ]
    if not names:
        raise ValueError(f"apply_lora: no linear layer named any of {cfg.target_modules}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`)."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that `apply_lora` prepared with the same settings;
    the keys must match its adapters exactly."""
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    if not own:
        raise ValueError("load_lora: the model has no LoRA adapters (call apply_lora first)")
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"load_lora: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"load_lora: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)} "
                "(another rank or model?)"
            )
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _token_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """The input embedding and, when untied, the output matrix: both have a row per token."""
    matrices = {"model.embed_tokens": model.model.embed_tokens.weight}
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        matrices["lm_head"] = model.lm_head.weight
    return matrices


def train_token_rows(model: nn.Module, token_ids: list[int]) -> None:
    """Let only the rows of `token_ids` in the embedding (and untied output) matrices train.
    A hook zeroes every other row's gradient, so AdamW never moves those rows (its update
    is 0/eps for a gradient that was always 0; these matrices get no weight decay), and
    `count_trainable` counts the chosen rows only."""
    for weight in _token_matrices(model).values():
        if hasattr(weight, "row_hook"):
            raise ValueError("train_token_rows: rows already chosen (merge_lora first)")
        keep = torch.zeros(weight.size(0), 1, dtype=weight.dtype, device=weight.device)
        keep[token_ids] = 1.0
        weight.requires_grad_(True)
        weight.row_hook = weight.register_hook(lambda grad, keep=keep: grad * keep)
        weight.trainable_rows = len(token_ids)


ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_KEYS = ("rank", "alpha", "dropout", "target_modules", "token_ids", "base_model")
TOKEN_ROWS = ".token_rows"  # suffix of the saved rows: "model.embed_tokens.token_rows"


def save_adapter(
    directory: Path, model: nn.Module, cfg: LoRAConfig, base_model: str, token_ids: list[int]
) -> None:
    """Write the adapters of `model` (prepared by `apply_lora` with `cfg`) and the trained
    rows of `token_ids` (`train_token_rows`; none when empty) to `directory`: a few MB
    instead of a whole model, and `base_model` records what they apply to."""
    tensors = lora_state_dict(model)
    if not tensors:  # e.g. called after merge_lora: an empty adapter would load as the base
        raise ValueError("save_adapter: the model has no LoRA adapters (save before merge_lora)")
    if token_ids:
        for name, weight in _token_matrices(model).items():
            tensors[name + TOKEN_ROWS] = weight.detach()[token_ids].clone()
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(tensors, directory / ADAPTER_WEIGHTS)
    record = {**cfg.model_dump(), "token_ids": list(token_ids), "base_model": base_model}
    write_json_atomic(directory / ADAPTER_CONFIG, record)


def read_adapter_config(directory: Path) -> tuple[LoRAConfig, str, list[int]]:
    """The LoRAConfig, base model and trained token rows' ids of an adapter directory. Every
    key is required: a default filled in for a missing one (rank 8, say) would load as a
    wrong adapter."""
    path = directory / ADAPTER_CONFIG
    record = read_json(path, f"is {directory} an adapter directory?")
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: expected a JSON object with keys {list(ADAPTER_KEYS)}")
    missing = [k for k in ADAPTER_KEYS if k not in record]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r}")
    base_model = record.pop("base_model")
    token_ids = record.pop("token_ids")
    if not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        raise CheckpointError(f"{path}: token_ids must be a list of token ids")
    try:
        return LoRAConfig.model_validate(record), str(base_model), token_ids
    except ValidationError as e:
        bad = ", ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CheckpointError(f"{path}: bad value ({bad})") from None


def load_adapter(directory: Path, model: nn.Module) -> LoRAConfig:
    """Put the adapters saved in `directory` on `model` (their base model, without adapters):
    `apply_lora` with the saved config, then the saved tensors. Returns the config."""
    cfg, _, token_ids = read_adapter_config(directory)
    path = directory / ADAPTER_WEIGHTS
    tensors = load_tensors(path)
    rows = {k: tensors.pop(k) for k in list(tensors) if k.endswith(TOKEN_ROWS)}
    apply_lora(model, cfg)
    try:
        load_lora(model, tensors)
        matrices = _token_matrices(model)
        if token_ids and set(rows) != {name + TOKEN_ROWS for name in matrices}:
            raise ValueError(
                f"token rows {sorted(rows)} do not fit this model's {sorted(matrices)}"
            )
        with torch.no_grad():
            for name, weight in matrices.items():
                if token_ids:
                    weight[token_ids] = rows[name + TOKEN_ROWS].to(weight.dtype)
    except (ValueError, IndexError, RuntimeError) as e:  # another base model or config
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + (alpha / rank) * B A, and put plain
    `Linear` layers back: the state dict then has exactly the base model's keys. All
    parameters train again (requires_grad True), as in a freshly built model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
        if hasattr(p, "row_hook"):  # every row trains again too
            p.row_hook.remove()
            del p.row_hook, p.trainable_rows
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once, and a matrix of
    which only some rows train (`train_token_rows`) counts those rows."""
    params = list(model.parameters())  # parameters() yields a shared tensor once

    def trainable(p: torch.Tensor) -> int:
        rows = getattr(p, "trainable_rows", None)
        return p[0].numel() * rows if rows is not None else p.numel()

    return sum(trainable(p) for p in params if p.requires_grad), sum(p.numel() for p in params)
