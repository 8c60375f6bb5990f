"""The C++ decoding step (`lmforge.model.native`) against the PyTorch step it stands in for,
on shapes that take each of its paths, and its build: cached, and a fallback when it fails."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from lmforge.generate import left_pad, sample_completions
from lmforge.model import KVCache, native
from lmforge.model.lora import apply_lora
from lmforge.model.transformer import attention_mask

needs_native = pytest.mark.skipif(
    native.library() is None, reason="the C++ decoding step could not be built here"
)

SHAPES = {
    # the conftest model: head dim 8 (attention without vectors), 300 outputs (a tail of 12)
    "tiny": {},
    # head dim 32, no grouping of heads, outputs in whole tiles
    "head32": dict(dim=64, n_heads=2, n_kv_heads=2, ffn_dim=96, vocab_size=256),
    # head dim 16, 4 query heads per key/value head, q/k/v biases, untied output
    "qwen-like": dict(
        dim=64,
        n_heads=4,
        n_kv_heads=1,
        ffn_dim=80,
        vocab_size=77,
        qkv_bias=True,
        tie_embeddings=False,
    ),
    # head dim 16, 3 query heads per key/value head (attention's values two heads, then one)
    "groups-of-3": dict(dim=96, n_heads=6, n_kv_heads=2, ffn_dim=64, vocab_size=100),
    # 24 inputs: no whole vector anywhere, every product scalar
    "odd": dict(dim=24, n_heads=2, n_kv_heads=1, ffn_dim=40, vocab_size=50),
}


def shaped_model(make_model, name: str):
    model = make_model(seed=3, init_std=0.2, max_seq_len=96, **SHAPES[name])
    with torch.no_grad():  # biases start at zero: give them values, so that they count
        for p_name, p in model.named_parameters():
            if p_name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def torch_step(model, tokens, positions, valid, cache):
    """PyTorch's decoding step, as generate runs it without the C++ one."""
    q_end = cache.length + 1
    hidden = model.hidden_states(
        tokens[:, None],
        positions=positions[:, None],
        mask=attention_mask(valid, q_end - 1, q_end, padded=True),
        cache=cache,
    )
    return model.lm_head(hidden[:, -1])


@needs_native
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("batch", [1, 2, 5, 19])  # 19: tiles of 2 rows and one left over
def test_the_native_step_computes_what_the_pytorch_step_does(make_model, name, batch):
    model = shaped_model(make_model, name)
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 20, (batch,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    steps = 6
    ids, valid = left_pad(prompts, 0, "cpu")
    valid = torch.cat([valid, torch.ones(batch, steps, dtype=torch.bool)], 1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    T0 = ids.size(1)
    with torch.inference_mode():
        caches = [KVCache.empty(model.cfg, batch, T0 + steps, "cpu", torch.float32) for _ in "ab"]
        for cache in caches:
            model.hidden_states(
                ids, positions[:, :T0], attention_mask(valid, 0, T0, True), cache=cache
            )
        step = native.NativeStep.of(model)
        assert step is not None
        for t in range(steps):
            tokens = torch.randint(0, vocab, (batch,), generator=gen)
            at = T0 + t  # the new token's column
            expected = torch_step(model, tokens, positions[:, at], valid[:, : at + 1], caches[0])
            got = step(tokens, positions[:, at], valid, caches[1])
            assert got.shape == (batch, vocab) and caches[1].length == at + 1
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            # the new keys and values went where the PyTorch step put them
            torch.testing.assert_close(caches[1].k[:, :, :, at], caches[0].k[:, :, :, at])
            torch.testing.assert_close(caches[1].v[:, :, :, at], caches[0].v[:, :, :, at])


@needs_native
@pytest.mark.parametrize("name", ["head32", "tiny", "qwen-like", "groups-of-3"])
def test_a_rows_logits_do_not_depend_on_the_batch_or_the_threads(make_model, name):
    # a step for row 2 alone, in a batch of 7 and with one thread, from the same cache (which
    # PyTorch's prefill fills differently for batches of other sizes): the same, bit for bit.
    # Alone, a row with one key/value head splits its query heads among the threads.
    model = shaped_model(make_model, name)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (7, 9), generator=gen)
    tokens = torch.randint(0, model.cfg.vocab_size, (7,), generator=gen)
    step = native.NativeStep.of(model)
    prompts = KVCache.empty(model.cfg, 7, 16, "cpu", torch.float32)
    with torch.inference_mode():
        model.hidden_states(ids, cache=prompts)

    def logits(rows: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            cache = prompts.select_rows(torch.tensor(rows))
            return step(tokens[rows], torch.full((len(rows),), 9), None, cache)

    batched = logits(list(range(7)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = logits(list(range(7)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits([2])[0], batched[2])
    assert torch.equal(one_thread, batched)


@needs_native
def test_bad_tokens_positions_or_caches_are_refused_before_anything_is_written(make_model):
    model = make_model()  # vocab 300, max_seq_len 64
    step = native.NativeStep.of(model)
    cache = KVCache.empty(model.cfg, 2, 8, "cpu", torch.float32)
    with torch.inference_mode():
        model.hidden_states(torch.tensor([[1, 2], [3, 4]]), cache=cache)
        before = cache.k.clone()
        for tokens, positions, match in [
            ([1, 300], [2, 2], "outside the vocabulary"),
            ([-1, 5], [2, 2], "outside the vocabulary"),
            ([1, 5], [2, 64], "past max_seq_len"),
            ([1, 5, 6], [2, 2, 2], "rows"),
        ]:
            with pytest.raises(ValueError, match=match):
                step(torch.tensor(tokens), torch.tensor(positions), None, cache)
            assert cache.length == 2 and torch.equal(cache.k, before)
        other = KVCache.empty(make_model(n_layers=3).cfg, 2, 8, "cpu", torch.float32)
        with pytest.raises(ValueError, match="this model's"):
            step(torch.tensor([1, 5]), torch.tensor([0, 0]), None, other)
        cache.length = 8  # full
        with pytest.raises(ValueError, match="free positions"):
            step(torch.tensor([1, 5]), torch.tensor([8, 8]), None, cache)


@needs_native
def test_sampling_draws_the_same_tokens_with_either_step(make_model, monkeypatch):
    model = shaped_model(make_model, "qwen-like")
    prompts = [[5, 17, 9], [3, 1, 4, 1, 5, 9, 26], [42], [5, 17, 9]]
    options = dict(seed=[1, 2, 3, 4], with_logprobs=True, stop_ids=[7], pad_id=0)
    fast = sample_completions(model, prompts, [12, 5, 12, 9], **options)
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    slow = sample_completions(model, prompts, [12, 5, 12, 9], **options)
    assert [c.tokens for c in fast] == [c.tokens for c in slow]
    assert [c.stopped for c in fast] == [c.stopped for c in slow]
    assert len({len(c.tokens) for c in fast}) > 1  # rows finished at different steps
    for a, b in zip(fast, slow):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@needs_native
def test_the_native_step_only_takes_models_it_computes_exactly(make_model, monkeypatch):
    from lmforge.config import LoRAConfig

    assert native.NativeStep.of(make_model()) is not None
    # bf16 products (online RL's option), bf16 weights, LoRA adapters: PyTorch's step
    model = make_model()
    with model.matmuls_in(torch.bfloat16):
        assert native.NativeStep.of(model) is None
    assert native.NativeStep.of(make_model().to(torch.bfloat16)) is None
    adapted = make_model()
    apply_lora(adapted, LoRAConfig(rank=2))
    assert native.NativeStep.of(adapted) is None
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    assert native.NativeStep.of(make_model()) is None


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A build of the library into an empty cache directory, not the one other tests use."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    native._build.cache_clear()
    yield tmp_path
    native._build.cache_clear()


@needs_native
def test_the_library_is_built_once_and_then_loaded(fresh_build, monkeypatch):
    assert native.library() is not None
    (built,) = (fresh_build / "native").glob("decode_step-*.so")
    native._build.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.library() is not None
    assert list((fresh_build / "native").glob("decode_step-*.so")) == [built]


def test_a_failed_build_warns_and_decoding_runs_in_pytorch(fresh_build, monkeypatch, make_model):
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.warns(UserWarning, match="building decode_step.cpp failed"):
        assert native.library() is None
    assert not list((fresh_build / "native").glob("*.so"))  # nothing half-written is kept
    model = make_model()
    assert native.NativeStep.of(model) is None
    # generation goes on, in PyTorch
    out = sample_completions(model, [[1, 2, 3]], 4, temperature=0.0)
    assert len(out[0].tokens) == 4


def test_no_compiler_warns_and_decoding_runs_in_pytorch(fresh_build, monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ nor c++ on it
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert native.library() is None


def test_an_unwritable_cache_directory_warns_and_decoding_runs_in_pytorch(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LMFORGE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="no C\\+\\+ decoding step"):
        assert native.library() is None


@needs_native
def test_a_library_that_does_not_match_the_structs_is_not_used(fresh_build, monkeypatch):
    # as when decode_step.cpp is edited after native.py was imported: the library's Model
    # has other fields than the ctypes one, and a step would read garbage pointers
    class Longer(ctypes.Structure):
        _fields_ = [*native._Model._fields_, ("extra", ctypes.c_int64)]

    monkeypatch.setattr(native, "_Model", Longer)
    with pytest.warns(UserWarning, match="does not match"):
        assert native.library() is None
