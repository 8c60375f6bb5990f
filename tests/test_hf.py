"""Hugging Face interop: import Llama/Qwen2 checkpoints, export to transformers, round trips,
imported tokenizers with their own special ids, and the errors of unusable checkpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_lines
from safetensors.torch import load_file
from tokenizers import trainers
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.generate import generate
from lmforge.io import CheckpointError, load_model_dir, save_model_dir
from lmforge.model.hf import export_hf, import_hf
from lmforge.tokenizer import TokenizerError, build_untrained

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of 中国? 😀 12+7"},
    {"role": "assistant", "content": "  北京, with spaces\nand lines  "},
    {"role": "user", "content": "👨‍👩‍👧 thanks"},
]


def _own_specials_tokenizer():
    """A byte-level BPE whose specials are not lmforge's: `<s>` `</s>` `<pad>` after the
    vocabulary, wrapped as transformers would save it."""
    hf = build_untrained()
    trainer = trainers.BpeTrainer(vocab_size=350, show_progress=False)
    hf.train_from_iterator(corpus_lines(), trainer=trainer)
    hf.add_special_tokens(["<s>", "</s>", "<pad>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _hf_model(arch: str, vocab_size: int, tie: bool, n_kv_heads: int, seed: int = 0):
    """A small random HF model; every weight (norms and biases too) drawn at random."""
    config_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    model_cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p)
            )
    return model


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def _hf_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or (transformers 5) a BatchEncoding."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    return list(result)


@pytest.mark.parametrize(
    "arch, tie, n_kv_heads, shard",
    [("llama", False, 2, False), ("llama", True, 1, True), ("qwen2", False, 2, False)],
    ids=["llama-gqa-untied", "llama-mqa-tied-sharded", "qwen2-bias"],
)
def test_import_matches_hf_logits(tmp_path, arch, tie, n_kv_heads, shard):
    hf_tok = _own_specials_tokenizer()
    hf_model = _hf_model(arch, len(hf_tok), tie, n_kv_heads)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir, max_shard_size="20KB" if shard else "5GB")
    hf_tok.save_pretrained(hf_dir)
    if shard:
        assert (hf_dir / "model.safetensors.index.json").exists()
    cfg = import_hf(hf_dir, tmp_path / "ours")
    assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.qkv_bias) == (tie, n_kv_heads, arch == "qwen2")
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == (5000.0, 1e-6, 64)
    model, tok = load_model_dir(tmp_path / "ours")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
        hf_tok.convert_tokens_to_ids(["<s>", "</s>", "<pad>"])
    )
    idx = torch.randint(0, len(hf_tok), (2, 13), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, idx), _logits(hf_model, idx), atol=1e-4, rtol=0)


@pytest.fixture()
def lmforge_dir(tmp_path, make_model, tokenizer, request) -> Path:
    """An lmforge model directory; request.param: ModelConfig overrides."""
    model = make_model(seed=2, vocab_size=tokenizer.vocab_size, init_std=0.2, **request.param)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.3 * torch.randn_like(p))
    save_model_dir(tmp_path / "ours", model, tokenizer)
    return tmp_path / "ours"


BOTH_KINDS = [{"tie_embeddings": True}, {"tie_embeddings": False, "qkv_bias": True}]


@pytest.mark.parametrize("lmforge_dir", BOTH_KINDS, indirect=True, ids=["llama-tied", "qwen2"])
def test_export_loads_in_transformers(tmp_path, lmforge_dir):
    export_hf(lmforge_dir, tmp_path / "hf")
    model, tok = load_model_dir(lmforge_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "Qwen2ForCausalLM" if model.cfg.qkv_bias else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not model.cfg.tie_embeddings)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, tok.end_id] == [2, 6]
    idx = torch.randint(0, tok.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(hf_model, idx), _logits(model, idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("lmforge_dir", BOTH_KINDS[:1], indirect=True, ids=["llama"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_exported_chat_template_matches_render_chat(tmp_path, lmforge_dir, generation_prompt):
    export_hf(lmforge_dir, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, tok = load_model_dir(lmforge_dir)
    messages = MESSAGES if generation_prompt else MESSAGES[:3]
    got = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    assert _hf_ids(got) == tok.render_chat(messages, add_generation_prompt=generation_prompt)[0]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("lmforge_dir", BOTH_KINDS, indirect=True, ids=["llama-tied", "qwen2"])
def test_export_import_round_trip_is_identical(tmp_path, lmforge_dir):
    export_hf(lmforge_dir, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    before = load_file(lmforge_dir / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert json.loads((tmp_path / "back" / "model.json").read_text()) == json.loads(
        (lmforge_dir / "model.json").read_text()
    )
    (_, tok), (_, back) = load_model_dir(lmforge_dir), load_model_dir(tmp_path / "back")
    assert back.sha256() == tok.sha256()
    assert back.render_chat(MESSAGES) == tok.render_chat(MESSAGES)
    ids = (back.pad_id, back.bos_id, back.eos_id, back.end_id, back.role_ids)
    assert ids == (0, 1, 2, 6, {"system": 3, "user": 4, "assistant": 5})


def test_imported_tokenizer_keeps_its_special_ids_in_generate(tmp_path):
    hf_tok = _own_specials_tokenizer()
    hf_model = _hf_model("llama", len(hf_tok), tie=False, n_kv_heads=2)
    hf_model.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    model, tok = load_model_dir(tmp_path / "ours")
    assert tok.eos_id == hf_tok.eos_token_id >= 350 and tok.end_id == tok.eos_id
    a, b, c = tok.encode("the quick fox")[:3]
    # a successor model: with attention and MLP silenced, the hidden state is the last
    # token's embedding; embeddings a, b, c are one-hot and the head maps a->b->c->eos
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for k, (tid, nxt) in enumerate([(a, b), (b, c), (c, tok.eos_id)]):
            model.model.embed_tokens.weight[tid, k] = 1.0
            model.lm_head.weight[nxt, k] = 1.0
    out = generate(model, [[tok.bos_id, a]], 10, temperature=0.0, stop_ids=[tok.eos_id])
    assert out == [[b, c]]
    assert tok.decode([tok.bos_id, a, tok.eos_id], skip_special=True) == tok.decode([a])
    with pytest.raises(TokenizerError, match="no lmforge chat markers"):
        tok.render_chat(MESSAGES)


def _config_json(tmp_path: Path, **changes) -> Path:
    hf_dir = tmp_path / "hf"
    hf_model = _hf_model("llama", 400, tie=True, n_kv_heads=2)
    hf_model.save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"head_dim": 16}, "head_dim"),
        ({"attention_bias": True}, "attention_bias"),
        ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_config_names_file_and_key(tmp_path, changes, key):
    hf_dir = _config_json(tmp_path, **changes)
    pattern = re.escape(str(hf_dir / "config.json")) + f".*{key}.*not supported"
    with pytest.raises(CheckpointError, match=pattern):
        import_hf(hf_dir, tmp_path / "out")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    hf_dir = _config_json(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"only safetensors.*pytorch_model\.bin"):
        import_hf(hf_dir, tmp_path / "out")


def test_missing_config_json_names_it(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "hf" / "config.json"))):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_missing_directory_that_is_no_hub_name(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize("lmforge_dir", BOTH_KINDS[:1], indirect=True, ids=["llama"])
def test_cli_export_then_import(tmp_path, lmforge_dir):
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", "--model", str(lmforge_dir), "--out", str(tmp_path / "hf")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back" / "model.safetensors").exists()


def test_cli_import_from_hub_offline_fails_clearly(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "import", "someone/tiny-llama", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "someone/tiny-llama: could not download it from the Hugging Face Hub" in result.stderr
