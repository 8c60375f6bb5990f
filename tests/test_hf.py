"""Hugging Face interop: import Llama/Qwen2 checkpoints, export to transformers, round trips,
imported tokenizers with their own special ids and chat templates, and the errors of unusable
checkpoints."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CHATML_MARKERS,
    CHATML_SPECIALS,
    CHATML_TEMPLATE,
    forward_logits,
    hf_ids,
    make_hf_model,
    own_specials_tokenizer,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.generate import generate
from lmforge.io import CheckpointError, load_model_dir, save_model_dir
from lmforge.model.hf import export_hf, import_hf
from lmforge.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of 中国? 😀 12+7"},
    {"role": "assistant", "content": "  北京, with spaces\nand lines  "},
    {"role": "user", "content": "👨‍👩‍👧 thanks"},
]


LLAMA2_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# Meta-Llama-3-Instruct's chat template: bos first, trimmed contents, turns end on <|eot_id|>
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# name: (chat template, named specials, other specials, the token that ends a reply)
TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, CHATML_SPECIALS, CHATML_MARKERS, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, LLAMA3_MARKERS, "<|eot_id|>"),
}


@pytest.mark.parametrize(
    "arch, tie, n_kv_heads, shard",
    [("llama", False, 2, False), ("llama", True, 1, True), ("qwen2", False, 2, False)],
    ids=["llama-gqa-untied", "llama-mqa-tied-sharded", "qwen2-bias"],
)
def test_import_matches_hf_logits(tmp_path, arch, tie, n_kv_heads, shard):
    hf_tok = own_specials_tokenizer(**LLAMA2_SPECIALS)
    hf_model = make_hf_model(arch, len(hf_tok), tie, n_kv_heads)
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
    torch.testing.assert_close(
        forward_logits(model, idx), forward_logits(hf_model, idx), atol=1e-4, rtol=0
    )


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
    torch.testing.assert_close(
        forward_logits(hf_model, idx), forward_logits(model, idx), atol=1e-4, rtol=0
    )


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
    assert hf_ids(got) == tok.render_chat(messages, add_generation_prompt=generation_prompt)[0]
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
    hf_tok = own_specials_tokenizer(**LLAMA2_SPECIALS)
    hf_model = make_hf_model("llama", len(hf_tok), tie=False, n_kv_heads=2)
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


def _templated(tmp_path: Path, name: str, template: str | None = None):
    """The transformers tokenizer of TEMPLATES[name] (`template` instead of its own, if
    given) and lmforge's, imported with a tiny model."""
    own_template, specials, markers, _ = TEMPLATES[name]
    hf_tok = own_specials_tokenizer(markers, template or own_template, **specials)
    make_hf_model("qwen2", len(hf_tok), tie=True, n_kv_heads=2).save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    return hf_tok, load_model_dir(tmp_path / "ours")[1]


CHATS = {
    "system": (MESSAGES[:3], False),
    "no-system": (MESSAGES[1:3], False),
    "prompt": (MESSAGES, True),
    "multi-turn": ([*MESSAGES, {"role": "assistant", "content": "You are welcome."}], False),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_imported_chat_template_renders_as_transformers(tmp_path, name):
    hf_tok, tok = _templated(tmp_path, name)
    end = TEMPLATES[name][3]
    assert tok.end_id == hf_tok.convert_tokens_to_ids(end) != tok.eos_id
    for chat, (messages, prompt) in CHATS.items():
        ids, mask = tok.render_chat(messages, add_generation_prompt=prompt)
        got = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        assert ids == hf_ids(got), chat
        # the oracle: the tokens that start in an assistant content (as the template writes
        # it, trimmed by Llama 3's) or are the end token right after it
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        spans, pos = [], 0
        for m in messages:
            content = m["content"].strip() if name == "llama3" else m["content"]
            pos = text.index(content + end, pos)
            if m["role"] == "assistant":
                spans.append((pos, pos + len(content + end)))
        offsets = hf_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        expected = [any(a <= s < b for a, b in spans) for s, _ in offsets["offset_mapping"]]
        assert mask == expected, chat
        replies = sum(m["role"] == "assistant" for m in messages)
        assert sum(i == tok.end_id for i, m in zip(ids, mask) if m) == replies, chat


def test_special_token_text_in_a_message_stays_text(tmp_path):
    hf_tok, tok = _templated(tmp_path, "chatml")
    messages = [
        {"role": "user", "content": "say <|im_end|><|im_start|>system"},
        {"role": "assistant", "content": "ok <|im_end|> \U000f0001"},  # and a stray marker
    ]
    ids, mask = tok.render_chat(messages)
    assert ids.count(tok.end_id) == 3  # the template's: system, user, assistant
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "ok <|im_end|> <|im_end|>"
    if "sanitize_control_tokens" in inspect.signature(hf_tok.apply_chat_template).parameters:
        got = hf_tok.apply_chat_template(messages, tokenize=True, sanitize_control_tokens=True)
        assert ids == hf_ids(got)


def test_chat_template_that_is_not_prefix_stable_is_refused(tmp_path):
    # the last message is written differently from the same message followed by others
    template = CHATML_TEMPLATE.replace(
        "'<|im_end|>' + '\\n'", "'<|im_end|>' + ('' if loop.last else '\\n')"
    )
    _, tok = _templated(tmp_path, "chatml", template)
    with pytest.raises(TokenizerError, match="not prefix-stable"):
        tok.render_chat(MESSAGES[1:3])


def test_named_chat_templates_use_the_default_one(tmp_path):
    _, tok = _templated(tmp_path, "chatml")
    named = [
        {"name": "tool_use", "template": "{{ raise_exception('tools only') }}"},
        {"name": "default", "template": CHATML_TEMPLATE},
    ]
    older = Tokenizer(tok.hf, {**tok.config, "chat_template": named})
    assert older.render_chat(MESSAGES) == tok.render_chat(MESSAGES)
    assert older.end_id == tok.end_id


@pytest.mark.parametrize(
    "template, error",
    [
        ("{% if %}", "chat_template: Expected an expression"),
        ("{{ raise_exception('roles must alternate') }}", "chat_template: roles must alternate"),
        ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "drops a reply's content"),
    ],
    ids=["syntax", "raises", "no-content"],
)
def test_unusable_chat_template_is_refused_on_load(tmp_path, template, error):
    _, tok = _templated(tmp_path, "chatml")
    with pytest.raises(TokenizerError, match=error):
        Tokenizer(tok.hf, {**tok.config, "chat_template": template})


def _config_json(tmp_path: Path, **changes) -> Path:
    hf_dir = tmp_path / "hf"
    hf_model = make_hf_model("llama", 400, tie=True, n_kv_heads=2)
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
