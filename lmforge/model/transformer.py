"""A Llama-style decoder-only transformer in one file.

RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward, grouped-query attention
through `scaled_dot_product_attention`, optional tied embeddings and optional q/k/v bias
(Qwen2). Parameter names are those of Hugging Face `LlamaForCausalLM` one for one
(`model.layers.0.self_attn.q_proj.weight` ...), so import and export are renames.

Initialisation (`Transformer.reset_parameters`): every linear and embedding weight is drawn
from N(0, init_std^2); the two projections that write into the residual stream (`o_proj`,
`down_proj`) use init_std / sqrt(2 * n_layers) so the residual's variance stays about
constant with depth (GPT-2); biases are zero and norm weights one.

Attention reads earlier keys and values from a cache: `KVCache`, preallocated and written in
place, for decoding; or `SharedPrefix`, for training on several continuations of one prompt
(`Transformer.continue_prefixes`: the prompt computed once, gradients through it).

Shapes: B batch, T new positions, S cached + new positions, H query heads, K key/value heads,
D head dim, C model dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 so bf16 activations keep their precision (as HF does)
        h = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)  # x / sqrt(mean(x^2) + eps)
        return self.weight * h.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that can multiply by a transposed, contiguous copy of its weight, and in
    another dtype than its parameters'.

    Decoding multiplies one row per sequence by every weight; on CPUs, MKL's product with
    the (out, in) weight of nn.Linear runs ~1.6x slower than `x @ weight_t` with weight_t
    stored (in, out). `Transformer.inference_layout()` makes those copies for the length of
    a `generate` call that decodes in PyTorch (float32 CPU decoding runs the C++ step of
    `lmforge.model.native`, which needs no copies); parameters, gradients and the state dict
    are untouched.

    With `matmul_dtype` (`Transformer.matmuls_in`), input and weight are rounded to it for
    the product and the result returned in the input's dtype: bf16 products with float32
    everything else, which on a CPU with bf16 instructions runs a GRPO step 1.26x faster,
    where autocast's bf16 activations made sampling slower."""

    weight_t: torch.Tensor | None = None
    matmul_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            y = product(x, self.weight_t)
        elif self.matmul_dtype is not None:
            y = F.linear(x.to(self.matmul_dtype), self.weight.to(self.matmul_dtype)).to(x.dtype)
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias


def product(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x @ weight_t (in, out) in weight_t's dtype, returned in x's: decoding's hot path, with
    no cast where the dtypes agree."""
    if x.dtype == weight_t.dtype:
        return x @ weight_t
    return (x.to(weight_t.dtype) @ weight_t).to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_seq_len, D), in HF's "rotate half" layout."""
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    )
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by angles given as (B or 1, 1, T, D) cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(q_start: int, q_end: int, device) -> torch.Tensor:
    """(1, 1, T, S) bool: query q_start + i may see keys 0 .. q_start + i."""
    s = torch.arange(q_end, device=device)
    return (s[None, :] <= s[q_start:q_end, None])[None, None]


def attention_mask(
    valid: torch.Tensor, q_start: int, q_end: int, padded: bool
) -> torch.Tensor | None:
    """The mask (B or 1, 1, T, S) for queries q_start..q_end-1 over keys 0..q_end-1 of rows
    whose real tokens are `valid` (B, S_max) (left padding), or None where the causal path
    (`is_causal`, or a single query) is exact: no padding, and no queries offset into a cache."""
    single = q_end - q_start == 1
    if not padded:
        return None if single or q_start == 0 else causal_mask(q_start, q_end, valid.device)
    mask = valid[:, None, None, :q_end]  # (B, 1, 1, S): real keys only
    if not single:
        mask = mask & causal_mask(q_start, q_end, valid.device)
    # a padding query attends to itself so that its (unused) row is not all -inf
    eye = torch.zeros_like(mask[:1])
    eye[..., torch.arange(q_end - q_start), torch.arange(q_start, q_end)] = True
    return mask | eye


@dataclass
class KVCache:
    """Preallocated keys and values for every layer; `length` positions are filled."""

    k: torch.Tensor  # (L, B, K, S_max, D)
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.dim // cfg.n_heads)
        return cls(
            torch.empty(shape, device=device, dtype=dtype),
            torch.empty(shape, device=device, dtype=dtype),
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values (B, K, T, D); return all of them so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, D)

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given batch rows (a row may repeat): their filled positions are
        copied."""
        shape = (self.k.size(0), len(rows), *self.k.shape[2:])
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        k[:, :, :, : self.length] = self.k[:, rows, :, : self.length]
        v[:, :, :, : self.length] = self.v[:, rows, :, : self.length]
        return KVCache(k, v, self.length)


@dataclass
class SharedPrefix:
    """Keys and values of prompts that several rows continue (a GRPO group's replies),
    computed once: for training, where a KVCache's in-place writes would break autograd.

    A pass over the P prompts (`rows` None) records each layer's keys and values; a pass over
    the B continuations (`rows` (B,): the prompt each continues) attends to its prompt's
    keys and values before its own. See `Transformer.continue_prefixes`."""

    rows: torch.Tensor | None = None
    k: list[torch.Tensor] = field(default_factory=list)  # per layer (P, K, T_prompt, D)
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions come from the caller; kept for hidden_states' bookkeeping

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            self.k.append(k)
            self.v.append(v)
            return k, v
        k = torch.cat([self.k[layer][self.rows], k], 2)  # (B, K, T_prompt + T, D)
        return k, torch.cat([self.v[layer][self.rows], v], 2)


@dataclass
class Kept:
    """The positions of a (batch, length) layout that the layers compute (`hidden_states`'
    `keep`), as flat indices: one nonzero for the whole pass, and index copies, which on a GPU
    do not wait for the host as boolean indexing does."""

    where: torch.Tensor  # (N,) indices into batch * length
    batch: int
    length: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> Kept:
        """The positions where mask (batch, length) is True."""
        return cls(mask.flatten().nonzero()[:, 0], *mask.shape)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (batch, length, ...), zeros at the positions not kept."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.where, x)
        return out.view(self.batch, self.length, *x.shape[1:])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, ...) -> (N, ...), the kept positions."""
        return x.flatten(0, 1).index_select(0, self.where)


class Attention(nn.Module):
    # while decoding (`Transformer.inference_layout`): the q, k and v weights side by side,
    # (C, (H + 2K) D), and their biases, for one product instead of three
    fused_t: torch.Tensor | None = None
    fused_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self, x, cos, sin, mask, cache: KVCache | SharedPrefix | None, layer: int, kept=None
    ) -> torch.Tensor:
        # x (B, T, C), or (N, C): the positions `kept` names (see hidden_states)
        if self.fused_t is not None:
            qkv = product(x, self.fused_t)
            qkv = qkv if self.fused_bias is None else qkv + self.fused_bias
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = qkv.split([self.n_heads * self.head_dim, kv_size, kv_size], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kept is not None:
            q, k, v = kept.pad(q), kept.pad(k), kept.pad(v)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
        # is_causal only when queries and keys start together; otherwise the caller's mask
        is_causal = mask is None and T > 1 and k.size(2) == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if kept is None else kept.gather(y))


class MLP(nn.Module):
    fused_t: torch.Tensor | None = None  # while decoding: gate and up weights side by side

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_t is not None:
            gate, up = product(x, self.fused_t).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, kept=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, kept)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (0 means: take the tokenizer's)")
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(
                "model: dim must divide into n_heads heads of even size, "
                "and n_heads must be a multiple of n_kv_heads"
            )
        self.cfg = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
                layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers)),
                norm=RMSNorm(cfg.dim, cfg.norm_eps),
            )
        )
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | SharedPrefix | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, C) for token ids `idx` (B, T).

        positions: (B, T) rotary positions; default: cache.length + 0..T-1 for every row.
        mask: (B, 1, T, S) bool, True where a query may attend to a key; default: causal.
        cache: a KVCache, filled at positions cache.length.. and advanced by T; or a
            SharedPrefix (see `continue_prefixes`).
        keep: (B, T) bool, the positions whose states are wanted; the others are padding
            that no kept position attends to (each row's kept positions come first: right
            padding), and get zeros. Only attention sees the (B, T) layout: every other
            layer runs on the kept positions alone. Not with a KVCache, whose zeros at the
            padding later steps would read.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            cos = self.rope_cos[start : start + T][None, None]  # (1, 1, T, D)
            sin = self.rope_sin[start : start + T][None, None]
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        if mask is None and cache is not None and start > 0 and T > 1:
            mask = causal_mask(start, start + T, idx.device)  # (1, 1, T, S): offset
        kept = None
        if keep is not None:
            if isinstance(cache, KVCache):
                raise ValueError("hidden_states: keep= leaves zeros that a KVCache would keep")
            kept = Kept.of(keep)
        # (B, T, C), or (N, C) for the kept positions
        x = self.model.embed_tokens(idx if kept is None else kept.gather(idx))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, kept)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        return x if kept is None else kept.pad(x)

    def forward(
        self, idx: torch.Tensor, wanted: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Logits (B, T, V); with `wanted`, only those of `logits_at` (N, V), through this
        method so that DDP sees the call. Keyword arguments as for `hidden_states`."""
        if wanted is not None:
            return self.logits_at(idx, wanted, **kwargs)
        return self.lm_head(self.hidden_states(idx, **kwargs))

    def logits_at(self, idx: torch.Tensor, wanted: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (N, V) at the N positions where wanted (B, T) is True, in row-major order,
        for token ids idx (B, T): what scoring a completion, or a loss on answers only, needs.
        Past each row's last wanted position (a right-padded row's padding) only attention
        runs, on zeros (see `hidden_states`' `keep`), and the output layer runs only at the
        wanted positions (on the world's preference pairs, half the positions are padding and
        a third are targets: a DPO step took half the time of full logits). Keyword
        arguments (`positions`, `mask`) as for `hidden_states`."""
        through = wanted.flip(1).cummax(1).values.flip(1)  # up to each row's last wanted
        states = self.hidden_states(idx, keep=through, **kwargs)
        return self.lm_head(Kept.of(wanted).gather(states))

    def continue_prefixes(
        self,
        prefixes: torch.Tensor,
        prefix_valid: torch.Tensor,
        continuations: torch.Tensor,
        rows: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, 1 + Tc, C) of the sequences prefixes[rows[b]] +
        continuations[b], from each prefix's last token on (so position i predicts
        continuation token i), each prefix computed once however many rows continue it.

        prefixes (P, Tp) left-padded, prefix_valid (P, Tp) True on their real tokens;
        continuations (B, Tc) right-padded (a row's real tokens never see its padding);
        rows (B,) long; keep (B, Tc) bool: the continuation positions whose states are
        wanted, the others computed only by attention, and zeros (see `hidden_states`;
        default: all). Gradients flow through both passes.
        """
        Tp, (B, Tc) = prefixes.size(1), continuations.shape
        padded = not bool(prefix_valid.all())
        shared = SharedPrefix()
        positions = (prefix_valid.long().cumsum(1) - 1).clamp(min=0)  # (P, Tp)
        mask = attention_mask(prefix_valid, 0, Tp, padded)
        last = self.hidden_states(prefixes, positions, mask, shared)[:, -1][rows]  # (B, C)
        if Tc == 0:
            return last[:, None]
        shared.rows = rows
        valid = torch.cat([prefix_valid[rows], prefix_valid.new_ones(B, Tc)], 1)  # (B, Tp + Tc)
        steps = torch.arange(Tc, device=prefixes.device)
        positions = prefix_valid.sum(1)[rows][:, None] + steps  # (B, Tc)
        mask = attention_mask(valid, Tp, Tp + Tc, padded=True)
        rest = self.hidden_states(continuations, positions, mask, shared, keep)  # (B, Tc, C)
        return torch.cat([last[:, None], rest], 1)

    @contextlib.contextmanager
    def inference_layout(self) -> Iterator[None]:
        """Within this block, linear layers use weight copies made once (see Linear): on CPU
        transposed and contiguous, in their `matmul_dtype` if they have one; on a GPU only
        where that dtype differs, so that no decoding step casts the weights again. Enter it
        within `matmuls_in`, whose dtype the copies take when they are made.

        Where the products cast (a `matmul_dtype` other than the weights'), the q, k and v
        projections, and gate and up, also get one copy side by side, for one product and one
        cast of the input each (unless one carries a LoRA adapter, whose term needs its own):
        with bf16 products on this CPU a decoding step took 2.12 instead of 2.39 ms at batch
        1, 3.20 instead of 3.61 at 16 and 6.90 instead of 7.70 at 64, and a GRPO rollout of
        8 x 8 replies 0.360 instead of 0.386 s (medians of 3 runs by turns); in float32, where
        nothing is cast, one product was up to 6% slower than three."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        cpu = next(self.parameters()).device.type == "cpu"

        def laid_out(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            weight_t = weight.detach().to(dtype).t()  # (in, out)
            return weight_t.contiguous() if cpu else weight_t

        before = [m.weight_t for m in linears]
        for m in linears:
            dtype = m.matmul_dtype or m.weight.dtype
            if cpu or dtype != m.weight.dtype:
                m.weight_t = laid_out(m.weight, dtype)
        blocks = [m for m in self.modules() if isinstance(m, (Attention, MLP))]
        for m in blocks:
            parts = (
                [m.q_proj, m.k_proj, m.v_proj]
                if isinstance(m, Attention)
                else [m.gate_proj, m.up_proj]
            )
            dtype = parts[0].matmul_dtype or parts[0].weight.dtype
            if dtype != parts[0].weight.dtype and all(type(p) is Linear for p in parts):
                m.fused_t = laid_out(torch.cat([p.weight for p in parts]), dtype)
                if parts[0].bias is not None:
                    m.fused_bias = torch.cat([p.bias.detach() for p in parts])
        try:
            yield
        finally:
            for m, weight_t in zip(linears, before):
                m.weight_t = weight_t
            for m in blocks:
                m.fused_t = None
                if isinstance(m, Attention):
                    m.fused_bias = None

    @contextlib.contextmanager
    def matmuls_in(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Within this block, linear layers multiply in `dtype` (None: their own; see Linear):
        forward, backward and sampling; on leaving, as they did before. Parameters,
        gradients and the optimiser's state are kept in float32."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        before = [m.matmul_dtype for m in linears]
        for m in linears:
            m.matmul_dtype = dtype
        try:
            yield
        finally:
            for m, earlier in zip(linears, before):
                m.matmul_dtype = earlier

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per non-embedding weight and the logits, plus attention."""
        c = self.cfg
        matmul_params = self.num_params(non_embedding=True) + c.vocab_size * c.dim
        return 6 * matmul_params + 12 * c.n_layers * c.dim * seq_len
