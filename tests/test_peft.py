"""LoRA adapter directories (with trained token rows): save/load round trip, merge, errors
that name the file, and the PEFT export that `PeftModel.from_pretrained` loads onto the
exported base model."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import ALL, batch, randomize_b
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import LoRAConfig
from lmforge.io import CheckpointError, load_model_dir, save_model_dir
from lmforge.model.hf import export_hf, export_peft
from lmforge.model.lora import (
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapter,
    train_token_rows,
)

CFG = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=ALL)
TOKEN_IDS = [5, 17, 250]  # rows trained next to the adapters, as for new chat markers
ROWS = ".token_rows"


def _inputs(vocab: int, seed: int = 0) -> torch.Tensor:
    """A random batch in which every trained token occurs."""
    x = batch(vocab, seed)
    x[:, 1 : 1 + len(TOKEN_IDS)] = torch.tensor(TOKEN_IDS)
    return x


def _token_matrices(model) -> dict[str, torch.Tensor]:
    """The matrices with a row per token: the embedding, and lm_head when untied."""
    matrices = {"model.embed_tokens": model.model.embed_tokens.weight}
    if not model.cfg.tie_embeddings:
        matrices["lm_head"] = model.lm_head.weight
    return matrices


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(
    params=[{"tie_embeddings": True}, {"tie_embeddings": False, "qkv_bias": True}],
    ids=["llama-tied", "qwen2"],
)
def adapted(request, tmp_path, make_model, tokenizer):
    """(adapted model, base model dir, adapter dir): a random base saved as a model directory,
    rank-4 adapters on every target, with random non-zero B, and the rows of TOKEN_IDS
    changed at random in the embedding (and untied lm_head), saved by save_adapter."""
    model = make_model(seed=3, vocab_size=tokenizer.vocab_size, init_std=0.2, **request.param)
    save_model_dir(tmp_path / "base", model, tokenizer)
    apply_lora(model, CFG)
    randomize_b(model, std=0.5)
    train_token_rows(model, TOKEN_IDS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # as training would: those rows move, no other row does
        for weight in _token_matrices(model).values():
            weight[TOKEN_IDS] += torch.randn(len(TOKEN_IDS), weight.size(1), generator=g) * 0.5
    save_adapter(tmp_path / "adapter", model, CFG, str(tmp_path / "base"), TOKEN_IDS)
    return model, tmp_path / "base", tmp_path / "adapter"


def test_adapter_directory_contents(adapted):
    model, base_dir, adapter_dir = adapted
    assert json.loads((adapter_dir / "adapter.json").read_text()) == {
        **CFG.model_dump(),  # rank 4, alpha 8.0, dropout 0.1, target_modules ALL, ...
        "token_ids": TOKEN_IDS,
        "base_model": str(base_dir),
    }
    assert read_adapter_config(adapter_dir) == (CFG, str(base_dir), TOKEN_IDS)
    tensors = load_file(adapter_dir / "adapter.safetensors")
    matrices = _token_matrices(model)
    assert len(tensors) == 2 * len(ALL) * model.cfg.n_layers + len(matrices)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(tensors[k], v), k
    for name, weight in matrices.items():
        assert torch.equal(tensors[name + ROWS], weight[TOKEN_IDS]), name


def test_load_adapter_round_trip_and_merge(adapted):
    model, base_dir, adapter_dir = adapted
    x = _inputs(model.cfg.vocab_size)
    expected = _logits(model, x)
    base, _ = load_model_dir(base_dir)
    assert not torch.allclose(_logits(base, x), expected, atol=1e-3)  # the adapters matter
    lora_only = copy.deepcopy(model)  # and so do the token rows
    with torch.no_grad():
        for name, weight in _token_matrices(lora_only).items():
            weight[TOKEN_IDS] = _token_matrices(base)[name][TOKEN_IDS]
    assert not torch.allclose(_logits(lora_only, x), expected, atol=1e-3)
    assert load_adapter(adapter_dir, base) == CFG
    assert torch.equal(_logits(base, x), expected)
    merge_lora(base)
    torch.testing.assert_close(_logits(base, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("rank"), "missing key 'rank'"),
        (lambda c: c.pop("base_model"), "missing key 'base_model'"),
        (lambda c: c.update(target_modules=["lm_head"]), r"bad value \(target_modules\.0"),
        (lambda c: c.update(rank="four"), r"bad value \(rank"),
        (lambda c: c.update(scale=2.0), r"bad value \(scale"),
    ],
    ids=["no-rank", "no-base", "bad-target", "bad-rank", "unknown-key"],
)
def test_bad_adapter_json_names_the_file(adapted, change, message):
    model, base_dir, adapter_dir = adapted
    path = adapter_dir / "adapter.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    base, _ = load_model_dir(base_dir)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": " + message):
        load_adapter(adapter_dir, base)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        export_peft(adapter_dir, adapter_dir.parent / "peft")


def test_unreadable_or_misfit_adapter_names_the_file(adapted, make_model):
    model, base_dir, adapter_dir = adapted
    path = adapter_dir / "adapter.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": not valid JSON"):
        load_adapter(adapter_dir, load_model_dir(base_dir)[0])
    path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": file is missing"):
        load_adapter(adapter_dir, load_model_dir(base_dir)[0])
    save_adapter(adapter_dir, model, CFG, str(base_dir), TOKEN_IDS)
    wider = make_model(vocab_size=model.cfg.vocab_size, dim=64, tie_embeddings=False)
    weights = re.escape(str(adapter_dir / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=weights + ": load_lora: .* has shape"):
        load_adapter(adapter_dir, wider)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(adapter_dir, merge_lora(model), CFG, str(base_dir), TOKEN_IDS)


@pytest.mark.parametrize("drop", ["all", "lm_head"])
def test_adapter_missing_token_rows_names_the_file(adapted, tmp_path, drop):
    """token_ids in adapter.json but row tensors missing: loading and exporting both refuse,
    naming adapter.safetensors (a PEFT export would otherwise leave those rows untrained)."""
    model, base_dir, adapter_dir = adapted
    if drop == "lm_head" and model.cfg.tie_embeddings:
        pytest.skip("a tied model has no lm_head rows")
    path = adapter_dir / "adapter.safetensors"
    tensors = load_file(path)
    dropped = [k for k in tensors if k.endswith(ROWS) and (drop == "all" or k.startswith(drop))]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": .*token rows"):
        export_peft(adapter_dir, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": .*token rows"):
        load_adapter(adapter_dir, load_model_dir(base_dir)[0])


def test_adapter_token_rows_without_token_ids_names_the_file(adapted, tmp_path):
    _, _, adapter_dir = adapted
    config_path = adapter_dir / "adapter.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "token_ids": []}))
    path = re.escape(str(adapter_dir / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=path + ": has token rows .* no token_ids"):
        export_peft(adapter_dir, tmp_path / "peft")


def test_peft_export_of_rows_needs_no_base_dir(adapted, tmp_path):
    """With the lmforge base gone, the export still writes the rows (and loads on the HF base,
    exported beforehand)."""
    transformers, peft = _peft_libraries()
    model, base_dir, adapter_dir = adapted
    export_hf(base_dir, tmp_path / "hf")
    (base_dir / "model.json").unlink()
    export_peft(adapter_dir, tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = _inputs(model.cfg.vocab_size, seed=5)
    torch.testing.assert_close(_logits(peft_model, x), _logits(model, x), atol=1e-4, rtol=0)


def _peft_libraries():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return transformers, peft


def test_peft_export_loads_and_matches_logits(adapted, tmp_path):
    transformers, peft = _peft_libraries()
    model, base_dir, adapter_dir = adapted
    export_hf(base_dir, tmp_path / "hf")
    export_peft(adapter_dir, tmp_path / "peft", str(tmp_path / "hf"))

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # PEFT's trainable tokens: the rows' new values (not deltas, despite the name)
    matrices = _token_matrices(model)
    rows = {f"base_model.model.{name}.token_adapter.trainable_tokens_delta" for name in matrices}
    assert tensors.keys() == {f"base_model.model.{k}" for k in lora_state_dict(model)} | rows
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    for name, weight in matrices.items():
        key = f"base_model.model.{name}.token_adapter.trainable_tokens_delta"
        assert torch.equal(tensors[key], weight[TOKEN_IDS]), name
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        8.0,
    )
    assert config["base_model_name_or_path"] == str(tmp_path / "hf")
    # a tied lm_head follows the embedding; an untied one is named beside it
    assert config["trainable_token_indices"] == (
        TOKEN_IDS if model.cfg.tie_embeddings else {"embed_tokens": TOKEN_IDS, "lm_head": TOKEN_IDS}
    )

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = _inputs(model.cfg.vocab_size, seed=4)
    expected = _logits(model, x)
    torch.testing.assert_close(_logits(peft_model, x), expected, atol=1e-4, rtol=0)
    # the config's base_model_name_or_path is enough on its own
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(auto, x), expected, atol=1e-4, rtol=0)
    # PEFT's merge agrees with lmforge's
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(
        _logits(merged, x), _logits(merge_lora(copy.deepcopy(model)), x), atol=1e-4, rtol=0
    )


def test_cli_export_adapter(adapted, tmp_path):
    _, base_dir, adapter_dir = adapted
    runner = CliRunner()
    out = tmp_path / "peft"
    args = ["export", "--adapter", str(adapter_dir), "--out", str(out), "--base", "me/tiny"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "me/tiny" and config["r"] == 4
    assert (out / "adapter_model.safetensors").exists()

    both = ["export", "--model", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    for args in (["export", "--out", str(out)], both):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "exactly one of --model and --adapter" in result.output
    result = runner.invoke(
        app, ["export", "--model", str(base_dir), "--out", str(out), "--base", "x"]
    )
    assert result.exit_code == 2 and "--base goes with --adapter" in result.output
