"""The transformer: Hugging Face parity, the KV cache, initialisation, parameter counting."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import left_pad
from lmforge.io import model_state
from lmforge.model import KVCache, Transformer
from lmforge.model.transformer import product


def _hf_config(cls, cfg: ModelConfig, **extra):
    return cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        **extra,
    )


def _randomise_norms_and_biases(model: Transformer, seed: int = 1) -> None:
    """Init sets norms to one and biases to zero; make them matter for the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("tie, n_kv_heads", [(True, 4), (False, 4), (True, 2), (False, 1)], ids=str)
def test_matches_hf_llama(make_model, tie, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    model = make_model(seed=3, tie_embeddings=tie, n_kv_heads=n_kv_heads, init_std=0.2)
    _randomise_norms_and_biases(model)
    hf = transformers.LlamaForCausalLM(
        _hf_config(transformers.LlamaConfig, model.cfg, attention_bias=False, mlp_bias=False)
    ).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    # the exported (deduplicated) state also fits, as import/export use it
    missing, unexpected = hf.load_state_dict(model_state(model), strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 17))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(input_ids=idx).logits
    assert ours.shape == (2, 17, model.cfg.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_qkv_bias_names_and_matches_hf_qwen2(make_model):
    model = make_model(seed=4, qkv_bias=True, tie_embeddings=False, init_std=0.2)
    names = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert names == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in ("q", "k", "v")
    }
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    assert model.model.layers[0].self_attn.k_proj.bias.shape == (16,)  # 2 kv heads of 8
    for n in names:
        assert torch.equal(model.get_parameter(n), torch.zeros_like(model.get_parameter(n)))
    _randomise_norms_and_biases(model)
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2ForCausalLM"):
        pytest.skip("transformers has no Qwen2")
    hf = transformers.Qwen2ForCausalLM(
        _hf_config(transformers.Qwen2Config, model.cfg, use_sliding_window=False)
    ).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    idx = torch.randint(
        0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(input_ids=idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_chunks_equal_full_forward(make_model, n_kv_heads):
    model = make_model(seed=5, n_kv_heads=n_kv_heads, init_std=0.2)
    idx = torch.randint(0, 300, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.empty(model.cfg, 3, 20, "cpu", torch.float32)
        parts = [model(idx[:, :5], cache=cache)]  # prefill
        assert cache.length == 5
        parts.append(model(idx[:, 5:8], cache=cache))  # a chunk offset into the cache
        for t in range(8, 14):  # then token by token
            parts.append(model(idx[:, t : t + 1], cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_logits_at_are_the_full_logits_at_the_wanted_positions_only(make_model):
    model = make_model()
    torch.manual_seed(1)
    x = torch.randint(5, 300, (3, 7))
    wanted = torch.zeros(3, 7, dtype=torch.bool)
    wanted[0, [2, 3, 6]] = True  # gaps between them
    wanted[1, 1:4] = True  # positions 4-6 as right padding
    full = model(x)[wanted]  # row 2 wants nothing
    model.zero_grad()
    full.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    seen = {"feed-forward": [], "output": []}  # positions each layer computes
    hooks = [
        model.model.layers[0].mlp.register_forward_hook(
            lambda m, args, out: seen["feed-forward"].append(args[0].shape[:-1].numel())
        ),
        model.lm_head.register_forward_hook(
            lambda m, args, out: seen["output"].append(args[0].shape[:-1].numel())
        ),
    ]
    model.zero_grad()
    got = model.logits_at(x, wanted)
    got.sum().backward()
    for hook in hooks:
        hook.remove()
    assert seen == {"feed-forward": [7 + 4 + 0], "output": [6]}
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)  # in row-major order
    for p, g in zip(model.parameters(), full_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_matmuls_in_bf16_round_the_products_only_and_leave_float32_after(make_model):
    """`matmuls_in(bf16)`: each linear layer's product is the product of the bf16-rounded
    input and weight, returned in float32 (with a float32 bias added), in training
    (gradients reach the float32 weights) and in the inference layout (bf16 weight copies,
    q/k/v and gate/up side by side for one product each); a nested block restores the outer
    one's dtype, and after the block the model is float32 to the last bit again."""
    model = make_model(seed=3, init_std=0.2, qkv_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    torch.manual_seed(2)
    x = torch.randint(5, 300, (2, 9))
    exact = model(x)
    attention = model.model.layers[0].self_attn
    layer = attention.q_proj  # one with a bias
    H, K, D = attention.n_heads, attention.n_kv_heads, attention.head_dim
    with torch.no_grad(), model.inference_layout():  # float32: nothing cast, nothing fused
        assert attention.fused_t is None and layer.weight_t.dtype == torch.float32
        torch.testing.assert_close(model(x), exact, atol=1e-5, rtol=1e-5)
    calls = []
    hook = layer.register_forward_hook(lambda m, args, out: calls.append((args[0], out)))
    with model.matmuls_in(torch.bfloat16):
        rounded = model(x)
        rounded.square().sum().backward()
        with model.matmuls_in(None):
            assert torch.equal(model(x), exact)
        with torch.no_grad(), model.inference_layout():
            assert layer.weight_t.dtype == attention.fused_t.dtype == torch.bfloat16
            assert attention.fused_t.shape == (model.cfg.dim, (H + 2 * K) * D)
            assert model.model.layers[0].mlp.fused_t.shape == (model.cfg.dim, 2 * model.cfg.ffn_dim)
            laid_out = model(x)
            h = calls[0][0]
            fused = product(h, attention.fused_t)[..., : H * D] + attention.fused_bias[: H * D]
        assert attention.fused_t is None and attention.fused_bias is None  # gone after the block
    hook.remove()
    assert len(calls) == 2  # the layout's q comes from the fused product, not q_proj's own
    bf16 = torch.nn.functional.linear(h.bfloat16(), layer.weight.bfloat16())
    assert calls[0][1].dtype == torch.float32 and torch.equal(
        calls[0][1], bf16.float() + layer.bias
    )
    # the layout's bf16 product may take another kernel: equal up to bf16 rounding
    torch.testing.assert_close(fused, bf16.float() + layer.bias, atol=0.02, rtol=0.01)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    difference = (rounded - exact).abs().max().item()
    assert 1e-4 < difference < 0.05 * exact.abs().max().item()  # bf16, and close
    torch.testing.assert_close(laid_out, rounded, atol=0.02, rtol=0.02)
    assert torch.equal(model(x), exact)
    assert all(m.matmul_dtype is None for m in model.modules() if hasattr(m, "matmul_dtype"))


@pytest.mark.parametrize("only_real", [False, True])
def test_shared_prefixes_give_each_row_its_own_states_and_gradients(make_model, only_real):
    """Two prompts of different lengths (one left-padded), three continuations each of
    different lengths (right-padded): every row's states and every gradient are those of the
    row's whole sequence run alone; with `only_real`, the padding is not computed but by
    attention (`keep`), and its states are zeros."""
    model = make_model(seed=9, init_std=0.2).train()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (5, 3)]
    conts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (4, 1, 6, 2, 6, 3)]
    rows = [0, 0, 0, 1, 1, 1]
    prefixes, valid = left_pad(prompts, 0, "cpu")
    width = max(len(c) for c in conts)
    padded = torch.tensor([c + [0] * (width - len(c)) for c in conts])
    keep = torch.tensor([[t < len(c) for t in range(width)] for c in conts])
    seen = []  # the positions the feed-forward layers compute in each pass
    hook = model.model.layers[0].mlp.register_forward_hook(
        lambda _, args, __: seen.append(args[0].shape[:-1].numel())
    )
    hidden = model.continue_prefixes(
        prefixes, valid, padded, torch.tensor(rows), keep if only_real else None
    )
    hook.remove()
    assert seen == [2 * 5, sum(map(len, conts)) if only_real else 6 * width]
    assert hidden.shape == (6, 1 + width, 32)
    assert (hidden[:, 1:][~keep] == 0).all() == only_real
    shared = sum(hidden[b, : 1 + len(c)].square().sum() for b, c in enumerate(conts))
    shared.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = 0
    for b, c in enumerate(conts):
        ids = torch.tensor([prompts[rows[b]] + c])
        states = model.hidden_states(ids)[0, len(prompts[rows[b]]) - 1 :]  # (1 + len(c), C)
        torch.testing.assert_close(hidden[b, : 1 + len(c)], states, atol=1e-5, rtol=1e-5)
        alone = alone + states.square().sum()
    alone.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    # continuations of one token only: the prompts' last states
    only = model.continue_prefixes(prefixes, valid, padded[:, :0], torch.tensor(rows))
    torch.testing.assert_close(only[:, 0], hidden[:, 0])
    # a cache would keep the zeros of positions not computed, for later steps to read
    cache = KVCache.empty(model.cfg, 6, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KVCache"):
        model.hidden_states(padded, cache=cache, keep=keep)


def test_rope_depends_only_on_relative_positions(make_model):
    model = make_model(seed=6, init_std=0.2)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    base = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        ref = model(idx)
        torch.testing.assert_close(model(idx, positions=base), ref, atol=1e-6, rtol=1e-6)
        shifted = model(idx, positions=base + 20)
    torch.testing.assert_close(shifted, ref, atol=1e-4, rtol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits(make_model):
    model = make_model(seed=7, init_std=0.2)
    a = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 300
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :6], lb[:, :6], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


def test_documented_initialisation(make_model):
    init_std, n_layers = 0.02, 2
    model = make_model(
        seed=8, dim=64, ffn_dim=128, n_layers=n_layers, qkv_bias=True, tie_embeddings=False
    )
    out, other = [], []
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out.append(p.detach().flatten())
        else:
            other.append(p.detach().flatten())
    out_w, other_w = torch.cat(out), torch.cat(other)
    expected_out = init_std / math.sqrt(2 * n_layers)  # 0.01
    assert out_w.numel() == n_layers * (64 * 64 + 128 * 64)
    assert abs(out_w.std().item() - expected_out) < 0.03 * expected_out
    assert abs(out_w.mean().item()) < 0.03 * expected_out
    assert abs(other_w.std().item() - init_std) < 0.02 * init_std
    assert abs(model.lm_head.weight.std().item() - init_std) < 0.03 * init_std
    assert abs(model.model.embed_tokens.weight.std().item() - init_std) < 0.03 * init_std


def test_tied_weights_share_storage(make_model):
    tied = make_model(tie_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with torch.no_grad():
        tied.model.embed_tokens.weight[3, 0] = 123.0
    assert tied.lm_head.weight[3, 0].item() == 123.0
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_num_params_counts_tied_weights_once(make_model):
    V, C, L, F, D = 300, 32, 2, 64, 8
    H, K = 4, 2
    per_layer = C * H * D + 2 * C * K * D + H * D * C + 3 * C * F + 2 * C  # 9280
    body = L * per_layer + C  # + final norm
    tied = make_model(tie_embeddings=True)
    untied = make_model(tie_embeddings=False)
    assert tied.num_params() == V * C + body == 28192
    assert untied.num_params() == 2 * V * C + body == 37792
    assert tied.num_params(non_embedding=True) == body
    assert untied.num_params(non_embedding=True) == body
    biased = make_model(qkv_bias=True)
    assert biased.num_params() == tied.num_params() + L * (H * D + 2 * K * D)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dim=30, n_heads=4),  # dim not divisible by heads
        dict(n_heads=4, n_kv_heads=3),  # heads not a multiple of kv heads
        dict(n_heads=4, n_kv_heads=8),  # more kv heads than heads
        dict(dim=36, n_heads=12, n_kv_heads=4),  # odd head dim: RoPE needs pairs
        dict(vocab_size=0),
    ],
)
def test_invalid_shapes_raise(make_model_config, overrides):
    cfg = make_model_config(**overrides)
    with pytest.raises(ValueError):
        Transformer(cfg)
