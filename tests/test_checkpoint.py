"""Checkpoints and model directories (safe, atomic, named errors); the optimizer and schedule."""

from __future__ import annotations

import json
import math
import re
import shutil
from itertools import pairwise

import pytest
import torch

from lmforge.io import (
    CheckpointError,
    load_model_dir,
    save_model_dir,
    sha256_file,
)
from lmforge.train_utils import (
    WeightAverage,
    build_optimizer,
    list_checkpoints,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)


def _train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=g)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _setup(make_model, seed=0, **overrides):
    model = make_model(seed=seed, **overrides).train()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    return model, opt


@pytest.fixture(scope="module")
def saved_once(make_model, tmp_path_factory):
    """A checkpoint after two training steps of a tiny untied model with q/k/v biases."""
    model, opt = _setup(make_model, tie_embeddings=False, qkv_bias=True)
    _train_steps(model, opt, 2)
    root = tmp_path_factory.mktemp("saved")
    path = save_checkpoint(root / "ckpt", 2, model, opt, {"data_step": 2}, keep_last=3)
    return path, model, opt


@pytest.fixture
def saved(saved_once, tmp_path):
    """A private copy of `saved_once` that a test may damage."""
    path, model, opt = saved_once
    shutil.copytree(path.parent, tmp_path / "ckpt")
    return tmp_path / "ckpt" / path.name, model, opt


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_restores_weights_optimizer_and_rng(make_model, tmp_path, tie):
    model, opt = _setup(make_model, seed=0, tie_embeddings=tie, qkv_bias=True)
    _train_steps(model, opt, 3)
    torch.manual_seed(1234)
    path = save_checkpoint(tmp_path / "ckpt", 3, model, opt, {"data_step": 3, "note": "é"}, 2)
    assert path == tmp_path / "ckpt" / "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    expected_rand = torch.rand(5)  # what the RNG gives right after the save

    fresh, fresh_opt = _setup(make_model, seed=99, tie_embeddings=tie, qkv_bias=True)
    torch.manual_seed(777)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert torch.equal(torch.rand(5), expected_rand)
    assert state["step"] == 3 and state["data_step"] == 3 and state["note"] == "é"

    ref_sd, got_sd = model.state_dict(), fresh.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    if tie:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

    ref_os, got_os = opt.state_dict(), fresh_opt.state_dict()
    assert ref_os["state"].keys() == got_os["state"].keys()
    assert len(ref_os["state"]) == len(list(model.parameters()))
    for i, s in ref_os["state"].items():
        assert set(s) == set(got_os["state"][i]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in s:
            assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(got_os["state"][i][key]))
        assert float(s["step"]) == 3.0
    for g_ref, g_got in zip(ref_os["param_groups"], got_os["param_groups"], strict=True):
        assert g_ref["params"] == g_got["params"]
        assert g_ref["weight_decay"] == g_got["weight_decay"]
        assert g_ref["lr"] == g_got["lr"]
        assert tuple(g_ref["betas"]) == tuple(g_got["betas"])

    # training continues identically from the restored state
    _train_steps(model, opt, 1, seed=5)
    _train_steps(fresh, fresh_opt, 1, seed=5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_state_json_records_sha256_of_each_file(saved):
    path, _, _ = saved
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == 2
    assert set(state["sha256"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    for name, digest in state["sha256"].items():
        assert sha256_file(path / name) == digest


def test_load_without_optimizer_restores_model(saved, make_model):
    path, model, _ = saved
    fresh = make_model(seed=5, tie_embeddings=False, qkv_bias=True)
    load_checkpoint(path, fresh, None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


def test_weight_average_follows_its_formula_and_resumes_from_a_checkpoint(make_model, tmp_path):
    model, opt = _setup(make_model)  # tied embeddings: the shared weight is averaged once
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.75)
    assert "lm_head.weight" not in average.tensors
    _train_steps(model, opt, 1)
    average.update()
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, 1, seed=1)
    average.update()
    for name, tensor in average.tensors.items():
        # 0.75^2 of the start, 0.25 * 0.75 of step 1's weights, 0.25 of step 2's
        want = 0.5625 * start[name] + 0.1875 * after_one[name] + 0.25 * model.state_dict()[name]
        assert torch.allclose(tensor, want, atol=1e-6), name
        assert not torch.allclose(tensor, model.state_dict()[name]), name
    path = save_checkpoint(tmp_path / "ckpt", 2, model, opt, {}, 2, {"average": average.tensors})
    state = json.loads((path / "state.json").read_text())
    assert state["sha256"]["average.safetensors"] == sha256_file(path / "average.safetensors")
    fresh, fresh_opt = _setup(make_model, seed=3)
    restored = WeightAverage(fresh, decay=0.75)
    load_checkpoint(path, fresh, fresh_opt, {"average": restored.tensors})
    for name, tensor in average.tensors.items():
        assert torch.equal(restored.tensors[name], tensor), name
    restored.copy_to_model()
    for name, p in fresh.named_parameters():
        assert torch.equal(p, average.tensors[name]), name
    assert torch.equal(fresh.lm_head.weight, average.tensors["model.embed_tokens.weight"])
    # an average of another model's shapes does not fit, and says where it comes from
    wider = WeightAverage(make_model(dim=64), decay=0.75)
    with pytest.raises(CheckpointError, match=r"step_00000002/average.safetensors: holds other"):
        load_checkpoint(path, fresh, None, {"average": wider.tensors})
    # a run that keeps an average cannot resume from a checkpoint written without one
    plain = save_checkpoint(tmp_path / "plain", 2, model, opt, {}, 2)
    with pytest.raises(CheckpointError, match=r"plain/step_00000002/average.safetensors"):
        load_checkpoint(plain, fresh, None, {"average": restored.tensors})


def test_keep_last_removes_older_checkpoints(make_model, tmp_path):
    model, opt = _setup(make_model)
    _train_steps(model, opt, 1)
    ckpt = tmp_path / "ckpt"
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(ckpt, step, model, opt, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000040", "step_00000050"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000040", "step_00000050"]
    # ordering is numeric (zero-padded), not by creation
    save_checkpoint(ckpt, 5, model, opt, {}, keep_last=3)
    assert [p.name for p in list_checkpoints(ckpt)] == [
        "step_00000005",
        "step_00000040",
        "step_00000050",
    ]


def test_leftover_temp_directory_is_ignored(saved):
    path, _, _ = saved
    ckpt = path.parent
    leftover = ckpt / ".tmp_step_00000009_4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    (ckpt / "step_00000099").write_text("a file, not a checkpoint")
    assert list_checkpoints(ckpt) == [path]
    assert list_checkpoints(ckpt / "missing") == []


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    for i in (len(data) // 2, len(data) - 3):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def _flip_header(p):
    data = bytearray(p.read_bytes())
    data[12] ^= 0x55  # inside the JSON header
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", _truncate),
        ("model.safetensors", _flip),
        ("model.safetensors", _flip_header),
        ("model.safetensors", lambda p: p.write_bytes(b"")),
        ("model.safetensors", lambda p: p.unlink()),
        ("optimizer.safetensors", _truncate),
        ("optimizer.safetensors", _flip),
        ("rng.safetensors", lambda p: p.unlink()),
        ("state.json", lambda p: p.unlink()),
        ("state.json", lambda p: p.write_bytes(b"\x00\xff\xfe garbage \x80")),
        ("state.json", lambda p: p.write_text("not json {", encoding="utf-8")),
        ("state.json", _truncate),
        ("state.json", lambda p: p.write_text("[]", encoding="utf-8")),
        ("state.json", lambda p: p.write_text("null", encoding="utf-8")),
        ("state.json", lambda p: p.write_text('"step 2"', encoding="utf-8")),
        ("state.json", lambda p: p.write_text("{}", encoding="utf-8")),
    ],
    ids=[
        "model-truncated",
        "model-flipped",
        "model-header-flipped",
        "model-empty",
        "model-deleted",
        "optimizer-truncated",
        "optimizer-flipped",
        "rng-deleted",
        "state-deleted",
        "state-binary-garbage",
        "state-text-garbage",
        "state-truncated",
        "state-json-array",
        "state-json-null",
        "state-json-string",
        "state-json-empty-object",
    ],
)
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(
    saved, make_model, name, damage
):
    path, _, _ = saved
    damage(path / name)
    model, opt = _setup(make_model, seed=3, tie_embeddings=False, qkv_bias=True)
    with pytest.raises(Exception) as info:
        load_checkpoint(path, model, opt)
    assert info.type is CheckpointError, f"{info.type.__name__}: {info.value}"
    assert str(path / name) in str(info.value)


def test_checkpoint_of_another_shape_does_not_fit(saved, make_model):
    path, _, _ = saved
    other, opt = _setup(make_model, tie_embeddings=False, qkv_bias=False)
    with pytest.raises(CheckpointError, match=re.escape(str(path / "model.safetensors"))):
        load_checkpoint(path, other, opt)


def test_model_dir_round_trip(make_model, tokenizer, tmp_path):
    model = make_model(seed=2, vocab_size=tokenizer.vocab_size, tie_embeddings=True)
    save_model_dir(tmp_path / "m", model, tokenizer)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "model.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded, tok = load_model_dir(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    idx = torch.tensor([tokenizer.encode("hello 你好")])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert tok.sha256() == tokenizer.sha256()


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1], ids=["empty", "7-bytes", "half", "minus-one"])
def test_model_dir_with_truncated_weights_names_the_file(make_model, tokenizer, tmp_path, keep):
    model = make_model(seed=2, vocab_size=tokenizer.vocab_size)
    save_model_dir(tmp_path / "m", model, tokenizer)
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    n = {0: 0, 7: 7, 0.5: len(data) // 2, -1: len(data) - 1}[keep]
    weights.write_bytes(data[:n])
    with pytest.raises(Exception) as info:
        load_model_dir(tmp_path / "m")
    assert info.type is CheckpointError, f"{info.type.__name__}: {info.value}"
    assert str(weights) in str(info.value)


def test_model_dir_missing_config_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "model.json"))):
        load_model_dir(tmp_path)


# ---- schedule and optimizer ---------------------------------------------------------------
def test_lr_warmup_is_linear():
    lr, warmup = 1e-2, 10
    values = [lr_at(s, 100, lr, warmup, 0.1) for s in range(warmup)]
    for s, v in enumerate(values):
        assert v == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)
    steps = [b - a for a, b in pairwise(values)]
    assert all(d == pytest.approx(lr / warmup, rel=1e-9) for d in steps)
    assert lr_at(warmup, 100, lr, warmup, 0.1) == pytest.approx(lr)


def test_lr_cosine_end_midpoint_and_symmetry():
    lr, warmup, max_steps, ratio = 3e-3, 10, 110, 0.1
    assert lr_at(max_steps, max_steps, lr, warmup, ratio) == pytest.approx(lr * ratio, rel=1e-12)
    assert lr_at(max_steps + 50, max_steps, lr, warmup, ratio) == pytest.approx(lr * ratio)
    mid = warmup + (max_steps - warmup) // 2
    assert lr_at(mid, max_steps, lr, warmup, ratio) == pytest.approx((lr + lr * ratio) / 2)
    quarter = warmup + (max_steps - warmup) // 4
    expected = lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(quarter, max_steps, lr, warmup, ratio) == pytest.approx(expected)
    for k in range(0, 50, 7):  # the cosine is symmetric around its midpoint
        a = lr_at(warmup + k, max_steps, lr, warmup, ratio)
        b = lr_at(max_steps - k, max_steps, lr, warmup, ratio)
        assert a + b == pytest.approx(lr * (1 + ratio))
    values = [lr_at(s, max_steps, lr, warmup, ratio) for s in range(warmup, max_steps + 1)]
    assert all(x >= y for x, y in pairwise(values))


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 50, 1e-3, 0, 0.0) == pytest.approx(1e-3)
    assert lr_at(50, 50, 1e-3, 0, 0.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizer_groups(make_model, tie):
    model = make_model(tie_embeddings=tie, qkv_bias=True)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay_group, no_decay_group = opt.param_groups
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay = {name_of[id(p)] for p in decay_group["params"]}
    no_decay = {name_of[id(p)] for p in no_decay_group["params"]}
    matrices = {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )
    }
    assert decay == matrices
    assert "model.embed_tokens.weight" in no_decay
    assert "model.norm.weight" in no_decay
    for i in range(2):
        assert f"model.layers.{i}.input_layernorm.weight" in no_decay
        assert f"model.layers.{i}.post_attention_layernorm.weight" in no_decay
        for p in "qkv":
            assert f"model.layers.{i}.self_attn.{p}_proj.bias" in no_decay
    # every parameter exactly once (a tied weight once)
    n_params = len(list(model.parameters()))
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == n_params
    assert not decay & no_decay
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3
