"""The decoding step in C++ (`decode_step.cpp`), for float32 models on the CPU.

`NativeStep.of(model)` gives a step function for a model, or None where the C++ step does
not apply (a GPU, other dtypes, LoRA adapters) or cannot be built (no C++ compiler);
`generate` then runs the PyTorch step, which computes the same logits up to float32
rounding. The library is compiled once per source, compiler and CPU into `$LMFORGE_CACHE`
(default ~/.cache/lmforge), in about 2 s; `LMFORGE_NATIVE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from lmforge.model.transformer import KVCache, Linear, Transformer

SOURCE = Path(__file__).with_name("decode_step.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


_pointer, _int = ctypes.c_void_p, ctypes.c_int32


class _Layer(ctypes.Structure):
    """decode_step.cpp's Layer: where one layer's weights are (a missing bias: null)."""

    _fields_ = [
        ("input_norm", _pointer),
        ("q", _pointer),
        ("k", _pointer),
        ("v", _pointer),
        ("q_bias", _pointer),
        ("k_bias", _pointer),
        ("v_bias", _pointer),
        ("o", _pointer),
        ("post_attention_norm", _pointer),
        ("gate", _pointer),
        ("up", _pointer),
        ("down", _pointer),
    ]


class _Model(ctypes.Structure):
    """decode_step.cpp's Model: the shapes, and where the other weights are."""

    _fields_ = [
        ("dim", _int),
        ("n_layers", _int),
        ("n_heads", _int),
        ("n_kv_heads", _int),
        ("head_dim", _int),
        ("ffn_dim", _int),
        ("vocab", _int),
        ("max_positions", _int),
        ("norm_eps", ctypes.c_float),
        ("embed", _pointer),
        ("final_norm", _pointer),
        ("lm_head", _pointer),
        ("rope_cos", _pointer),
        ("rope_sin", _pointer),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's flags (a home directory shared between
    machines must not hand one CPU's library to another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def library() -> ctypes.CDLL | None:
    """The compiled step, built on first use; None where `LMFORGE_NATIVE=0` turns it off,
    and (with one warning) where it cannot be built."""
    return None if os.environ.get("LMFORGE_NATIVE", "1") == "0" else _build()


@cache
def _build() -> ctypes.CDLL | None:
    """Compile the library into the cache directory unless it is there, and load it."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("lmforge: no C++ compiler found; decoding runs in PyTorch", stacklevel=2)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    cache_dir = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))
    built = cache_dir / "native" / f"decode_step-{key}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=built.parent) as tmp:
                out = Path(tmp) / built.name
                result = subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True
                )
                if result.returncode != 0:
                    warnings.warn(
                        f"lmforge: building {SOURCE.name} failed, decoding runs in PyTorch:\n"
                        f"{result.stderr[-2000:]}",
                        stacklevel=2,
                    )
                    return None
                os.replace(out, built)  # atomic: another process never loads half a library
        lib = ctypes.CDLL(str(built))
    except OSError as error:  # an unwritable cache directory, a library that does not load
        warnings.warn(
            f"lmforge: no C++ decoding step ({error}); decoding runs in PyTorch", stacklevel=2
        )
        return None
    model_size, layer_size = ctypes.c_int64(), ctypes.c_int64()
    lib.lmforge_struct_sizes(ctypes.byref(model_size), ctypes.byref(layer_size))
    if (model_size.value, layer_size.value) != (ctypes.sizeof(_Model), ctypes.sizeof(_Layer)):
        # a source edited after this module was imported: a step would read garbage pointers
        warnings.warn(
            f"lmforge: {built} does not match native.py; decoding runs in PyTorch", stacklevel=2
        )
        return None
    lib.lmforge_workspace_floats.restype = ctypes.c_int64
    lib.lmforge_workspace_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_int]
    lib.lmforge_decode_step.restype = ctypes.c_int
    lib.lmforge_decode_step.argtypes = [
        ctypes.POINTER(_Model),
        ctypes.c_int,
        ctypes.c_void_p,  # tokens
        ctypes.c_void_p,  # positions
        ctypes.c_void_p,  # valid
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_void_p,  # k cache
        ctypes.c_void_p,  # v cache
        ctypes.c_int64,
        ctypes.c_void_p,  # logits
        ctypes.c_void_p,  # workspace
    ]
    return lib


class NativeStep:
    """One decoding step through the C++ library, reading the model's own weights (so it is
    made again after the weights are replaced, not after they are updated in place)."""

    def __init__(self, model: Transformer, lib: ctypes.CDLL):
        cfg = model.cfg
        self.lib = lib
        self.owner = model  # the library is handed pointers into its tensors: keep them alive

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        layers = model.model.layers
        self._layers = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            self._layers[i] = _Layer(
                ptr(layer.input_layernorm.weight),
                ptr(attn.q_proj.weight),
                ptr(attn.k_proj.weight),
                ptr(attn.v_proj.weight),
                ptr(attn.q_proj.bias),
                ptr(attn.k_proj.bias),
                ptr(attn.v_proj.bias),
                ptr(attn.o_proj.weight),
                ptr(layer.post_attention_layernorm.weight),
                ptr(mlp.gate_proj.weight),
                ptr(mlp.up_proj.weight),
                ptr(mlp.down_proj.weight),
            )
        self.model = _Model(
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.dim // cfg.n_heads,
            cfg.ffn_dim,
            cfg.vocab_size,
            cfg.max_seq_len,
            cfg.norm_eps,
            ptr(model.model.embed_tokens.weight),
            ptr(model.model.norm.weight),
            ptr(model.lm_head.weight),
            ptr(model.rope_cos),
            ptr(model.rope_sin),
            self._layers,
        )
        self.vocab = cfg.vocab_size
        self.cache_shape = (cfg.n_layers, cfg.n_kv_heads, cfg.dim // cfg.n_heads)  # L, K, D
        self.work = torch.empty(0)

    @classmethod
    def of(cls, model: Transformer) -> NativeStep | None:
        """The C++ step for this model, or None where it does not apply."""
        params = list(model.parameters()) + [model.rope_cos, model.rope_sin]
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        applies = (
            all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
            and all(p.is_contiguous() for p in params)
            and all(type(m) is Linear and m.matmul_dtype is None for m in linears)
        )
        lib = library() if applies else None
        return cls(model, lib) if lib is not None else None

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """Logits (B, V) after each row's new token (B,) at rotary positions (B,), with keys
        0..cache.length that are real where valid (B, >= cache.length + 1) holds (None: all);
        the new keys and values go into the cache, whose length grows by one."""
        B, S = tokens.size(0), cache.length + 1
        # the C++ side reads and writes where these say, unchecked: check them here
        if (
            cache.k.dtype != torch.float32
            or not (cache.k.is_contiguous() and cache.v.is_contiguous())
            or cache.v.shape != cache.k.shape
            or cache.k.shape[0::2] != self.cache_shape
        ):
            raise ValueError(
                f"native decoding needs a contiguous float32 KV cache of this model's "
                f"(layers, kv heads, head dim) {self.cache_shape}"
            )
        if cache.k.size(1) != B or cache.k.size(3) < S or positions.shape != (B,):
            raise ValueError(
                f"native decoding: {B} tokens and {tuple(positions.shape)} positions for a cache "
                f"of {cache.k.size(1)} rows with {cache.k.size(3) - cache.length} free positions"
            )
        if valid is not None and (
            valid.dtype != torch.bool or valid.shape[0] != B or valid.size(1) < S
        ):
            raise ValueError(f"native decoding: valid must be ({B}, >= {S}) bool")
        tokens = tokens.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        # sized for the cache's last position: one allocation for a whole reply, not one a step
        need = self.lib.lmforge_workspace_floats(ctypes.byref(self.model), B, cache.k.size(3))
        if self.work.numel() < need:
            self.work = torch.empty(need)
        logits = torch.empty(B, self.vocab)
        if valid is not None:
            valid = valid.contiguous()
        error = self.lib.lmforge_decode_step(
            ctypes.byref(self.model),
            B,
            tokens.data_ptr(),
            positions.data_ptr(),
            valid.data_ptr() if valid is not None else None,
            valid.stride(0) if valid is not None else 0,
            S,
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            cache.k.size(3),
            logits.data_ptr(),
            self.work.data_ptr(),
        )
        if error:
            what = "token id outside the vocabulary" if error == 1 else "position past max_seq_len"
            raise ValueError(f"native decoding: a {what} (nothing was computed)")
        cache.length += 1
        return logits
