"""LoRA adapters: exact start, frozen base, merge, save/load, dropout, generation."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.config import LoRAConfig, ModelConfig
from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.model.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    load_lora,
    lora_state_dict,
    merge_lora,
)
from lmforge.train_utils import build_optimizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Give every B a nonzero value, as training would, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def test_starts_equal_to_base(make_model):
    base = make_model(seed=3, qkv_bias=True)
    lora = copy.deepcopy(base)
    names = apply_lora(lora, LoRAConfig(target_modules=ALL, dropout=0.1))
    assert len(names) == 7 * base.cfg.n_layers
    assert "model.layers.0.self_attn.q_proj" in names
    x = batch(base.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(lora(x), base(x))
    keys = lora.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys  # the base name is unchanged
    assert "model.layers.0.self_attn.q_proj.bias" in keys


def test_only_adapters_train(make_model):
    model = make_model(seed=0, tie_embeddings=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in opt_params) == (".lora_" in name) == p.requires_grad, name
    x = batch(model.cfg.vocab_size)
    for _ in range(3):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    changed = [k for k, v in lora_state_dict(model).items() if k.endswith("lora_B.weight")]
    assert changed and all(lora_state_dict(model)[k].abs().sum() > 0 for k in changed)


def test_trainable_share_default_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096))
    apply_lora(model, LoRAConfig(rank=8))
    trainable, total = count_trainable(model)
    share = trainable / total
    print(f"\nLoRA rank 8 on q_proj,v_proj: {trainable:,} of {total:,} parameters ({share:.2%})")
    assert 3_000_000 < total < 5_000_000
    assert share < 0.05


def test_merge_matches_and_restores_keys(make_model):
    base = make_model(seed=2, qkv_bias=True, tie_embeddings=False)
    base_keys = set(base.state_dict())
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(target_modules=ALL, rank=4, alpha=8.0))
    randomize_b(model)
    x = batch(base.cfg.vocab_size)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-3)  # the adapters matter
        merge_lora(model)
        merged = model(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert all(p.requires_grad for p in model.parameters())
    # a plain Transformer again: it loads into a fresh one
    fresh = Transformer(base.cfg).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), merged)


def test_save_load_roundtrip(make_model, tmp_path):
    cfg = LoRAConfig(rank=4, target_modules=["q_proj", "o_proj", "up_proj"])
    model = make_model(seed=5)
    apply_lora(model, cfg)
    randomize_b(model)
    tensors = lora_state_dict(model)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert len(tensors) == 2 * 3 * model.cfg.n_layers
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "adapter.safetensors")

    other = make_model(seed=5)  # same base, fresh adapters
    apply_lora(other, cfg)
    load_lora(other, load_file(tmp_path / "adapter.safetensors"))
    x = batch(model.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))

    with pytest.raises(ValueError, match="missing keys"):
        load_lora(other, dict(list(tensors.items())[1:]))
    wrong_rank = make_model(seed=5)
    apply_lora(wrong_rank, LoRAConfig(rank=2, target_modules=cfg.target_modules))
    with pytest.raises(ValueError, match="shape"):
        load_lora(wrong_rank, tensors)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora(make_model(seed=5), tensors)


def test_dropout_only_in_train_mode(make_model):
    model = make_model(seed=4)  # in eval mode
    apply_lora(model, LoRAConfig(dropout=0.5))
    assert not any(m.training for m in model.modules())  # the adapters keep the model's mode
    randomize_b(model)
    x = batch(model.cfg.vocab_size)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert not torch.equal(a, model(x))
    no_dropout = make_model(seed=4)
    apply_lora(no_dropout, LoRAConfig(dropout=0.0))
    assert isinstance(no_dropout.model.layers[0].self_attn.q_proj.lora_dropout, torch.nn.Identity)


def test_invalid_targets(make_model):
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(target_modules=["qproj"])
    with pytest.raises(ValueError):
        LoRAConfig(target_modules=[])
    with pytest.raises(ValueError):
        LoRAConfig(rank=0)
    # a config built without validation is still checked by apply_lora
    bad = LoRAConfig.model_construct(rank=8, alpha=16.0, dropout=0.0, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"unknown \['lm_head'\]"):
        apply_lora(make_model(), bad)
    model = make_model()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_inference_layout_keeps_adapter(make_model):
    model = make_model(seed=6, tie_embeddings=False)
    apply_lora(model, LoRAConfig(target_modules=ALL))
    randomize_b(model)
    x = batch(model.cfg.vocab_size)
    with torch.no_grad():
        plain = model(x)
        with model.inference_layout():
            assert model.model.layers[0].self_attn.q_proj.weight_t is not None
            laid_out = model(x)
    torch.testing.assert_close(laid_out, plain, atol=1e-5, rtol=1e-5)


def test_generate_adapter_equals_merged(make_model):
    model = make_model(seed=11, vocab_size=128, tie_embeddings=False, init_std=0.5)
    apply_lora(model, LoRAConfig(target_modules=ALL, rank=4))
    randomize_b(model, std=0.5)
    merged = merge_lora(copy.deepcopy(model))
    base = make_model(seed=11, vocab_size=128, tie_embeddings=False, init_std=0.5)
    prompts = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 26], [42], [7, 7, 8, 100, 2]]
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    assert out == generate(merged, prompts, max_new_tokens=12, temperature=0.0)
    assert out != generate(base, prompts, max_new_tokens=12, temperature=0.0)  # adapters matter
