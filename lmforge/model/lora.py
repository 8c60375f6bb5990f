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

    targets = apply_lora(model, LoRAConfig(rank=8))
    opt = build_optimizer(model, ...)          # sees only the adapters (requires_grad)
    ...                                         # train
    save_file(lora_state_dict(model), path)     # adapters only
    merge_lora(model)                           # before export
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import LoRAConfig
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


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + (alpha / rank) * B A, and put plain
    `Linear` layers back: the state dict then has exactly the base model's keys. All
    parameters train again (requires_grad True), as in a freshly built model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
