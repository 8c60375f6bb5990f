"""Tokenizer: reserved specials, exact round trips, pre-tokenization, chat template, files."""

from __future__ import annotations

import json
import random
import re

import pytest
from conftest import hf_ids

from lmforge.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    build_untrained,
)

N_SPECIAL = len(SPECIAL_TOKENS)
HAN = re.compile(r"[\u4e00-\u9fff]")


def token_char_sets(tok: Tokenizer, text: str) -> list[set[int]]:
    """For each token of encode(text), the indices of the characters its bytes belong to."""
    char_of_byte = []
    for i, ch in enumerate(text):
        char_of_byte += [i] * len(ch.encode("utf-8"))
    sets, pos = [], 0
    for tid in tok.encode(text):
        n = len(tok.decode_bytes([tid]))
        sets.append(set(char_of_byte[pos : pos + n]))
        pos += n
    assert pos == len(char_of_byte)
    return sets


def test_special_tokens_have_fixed_ids(tokenizer):
    assert SPECIAL_TOKENS == [
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tokenizer.hf.token_to_id(s) == i
        assert tokenizer.hf.id_to_token(i) == s
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.system_id, tokenizer.user_id) == (3, 4)
    assert (tokenizer.assistant_id, tokenizer.end_id) == (5, 6)
    assert tokenizer.pad_id != tokenizer.eos_id
    assert tokenizer.vocab_size == 400
    # every byte is in the vocabulary, after the specials
    assert len(set(tokenizer._byte_ids)) == 256
    assert min(tokenizer._byte_ids) >= N_SPECIAL


ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "你好世界，今天天气很好。",
    "北京是中国的首都",
    "mixed 中文 and English 123",
    "😀👍🎉",
    "👍🏽👍🏿 skin tones",
    "family 👨‍👩‍👧‍👦 and 👩🏽‍💻 zwj",
    "flags 🇨🇳🇺🇸",
    "❤️ variation selector",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\nnew\n\nlines\r\n",
    "  \n \t  \u3000 ",
    "a  b   c    d",
    "literal <|eos|> and <|user|> text",
    "<|bos|><|pad|><|system|><|assistant|><|end|>",
    "<|end|",
    "x<|eos|>y",
    "combining e\u0301 and ﬁ ligature",
    "zero\u200bwidth",
    "Ωmega ∑ ≠ ∞ Привет مرحبا שלום",
    "日本語のテキスト、한국어",
    "\x00\x01 control \x7f",
    "0123456789 3.14159 -42",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tokenizer.encode_bytes(text.encode("utf-8")) == ids


@pytest.mark.parametrize(
    "text", ["<|eos|>", "<|user|>", "say <|bos|>", "<|pad|><|end|>", "<|assistant|>hi"]
)
def test_literal_special_strings_are_plain_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert min(ids) >= N_SPECIAL
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "ok"])[0] == ids


def test_skip_special_drops_only_special_ids(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<|bos|>hi<|eos|>"
    assert tokenizer.decode(ids, skip_special=True) == "hi"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b"\xc3",  # truncated 2-byte sequence
        "你".encode()[:2],  # truncated 3-byte sequence
        b"abc\xe4\xb8",
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
        b"\xc0\xaf",  # overlong
        b"\x80\x80\x80",
        "好".encode() + b"\xfe" + "😀".encode()[:3] + b"tail",
        b"<|eos|>\xff<|user|>",
        b"",
    ],
)
def test_byte_round_trip_invalid_utf8(tokenizer, data):
    ids = tokenizer.encode_bytes(data)
    assert tokenizer.decode_bytes(ids) == data
    if b"<|" in data:
        assert min(ids) >= N_SPECIAL


def test_byte_round_trip_random(tokenizer):
    rng = random.Random(1234)
    alphabet = list(b"ab <|>") + list("你😀".encode())
    for _ in range(300):
        n = rng.randint(0, 40)
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(n))
        else:  # near-valid: pieces of multi-byte characters mixed with ASCII
            data = bytes(rng.choice(alphabet) for _ in range(n))
        ids = tokenizer.encode_bytes(data)
        assert tokenizer.decode_bytes(ids) == data, data
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_each_han_character_is_its_own_pre_token(tokenizer):
    text = "你好世界，今天天气很好。我们学习语言模型 北京是中国的首都abc"
    sets = token_char_sets(tokenizer, text)
    han_positions = {i for i, ch in enumerate(text) if HAN.match(ch)}
    for chars in sets:
        if chars & han_positions:
            assert len(chars) == 1, [text[i] for i in sorted(chars)]
    # the training corpus is full of "你好", so without the split it would be merged; the
    # characters themselves are merged from their bytes, so "你好" is exactly two tokens
    assert len(tokenizer.encode("你好")) == 2
    assert tokenizer.encode("你好") == tokenizer.encode("你") + tokenizer.encode("好")
    # full-width punctuation stands alone too
    assert tokenizer.encode("好，") == tokenizer.encode("好") + tokenizer.encode("，")


def test_digits_are_single_tokens(tokenizer):
    digit_ids = [tokenizer.encode(d) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert tokenizer.encode("2024") == digit_ids[2] + digit_ids[0] + digit_ids[2] + digit_ids[4]
    text = "year 1999 had 12+34=46 and x7"
    for chars in token_char_sets(tokenizer, text):
        if any(text[i].isdigit() for i in chars):
            assert len(chars) == 1


def test_untrained_pipeline_pre_tokenizes_as_documented():
    pieces = [p for p, _ in build_untrained().pre_tokenizer.pre_tokenize_str("ab你好12")]
    # ByteLevel maps bytes to printable characters; count the pieces
    assert len(pieces) == 5  # "ab", "你", "好", "1", "2"


def _expected_chat(tok, turns, generation_prompt=False):
    ids, mask = [tok.bos_id], [False]
    for role, content in turns:
        body = tok.encode(content) + [tok.end_id]
        ids += [tok.role_ids[role], *body]
        mask += [False] + [role == "assistant"] * len(body)
    if generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(False)
    return ids, mask


def test_render_chat_ids_and_mask_exact(tokenizer):
    sys_ids = tokenizer.encode("be brief")
    user_ids = tokenizer.encode("capital of 中国?")
    asst_ids = tokenizer.encode("北京 <|end|>")  # literal special text in a reply
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "capital of 中国?"},
        {"role": "assistant", "content": "北京 <|end|>"},
    ]
    ids, mask = tokenizer.render_chat(messages)
    assert ids == [1, 3, *sys_ids, 6, 4, *user_ids, 6, 5, *asst_ids, 6]
    n_prefix = 1 + 1 + len(sys_ids) + 1 + 1 + len(user_ids) + 1 + 1
    assert mask == [False] * n_prefix + [True] * (len(asst_ids) + 1)
    assert len(ids) == len(mask)
    # only one id 6 is inside the assistant's span: the literal "<|end|>" text is not it
    assert ids[n_prefix:].count(6) == 1 and ids[-1] == 6


def test_render_chat_two_assistant_turns_and_generation_prompt(tokenizer):
    turns = [("user", "hi"), ("assistant", "hello 😀"), ("user", "1+1?"), ("assistant", "2")]
    messages = [{"role": r, "content": c} for r, c in turns]
    assert tokenizer.render_chat(messages) == _expected_chat(tokenizer, turns)
    ids, mask = tokenizer.render_chat(messages[:3], add_generation_prompt=True)
    assert (ids, mask) == _expected_chat(tokenizer, turns[:3], generation_prompt=True)
    assert ids[-1] == tokenizer.assistant_id and mask[-1] is False
    assert sum(mask) == len(tokenizer.encode("hello 😀")) + 1


@pytest.mark.parametrize(
    "message", [{"role": "tool", "content": "x"}, {"role": "user"}, {"role": "user", "content": 3}]
)
def test_render_chat_rejects_bad_messages(tokenizer, message):
    with pytest.raises(ValueError, match="message 1"):
        tokenizer.render_chat([{"role": "user", "content": "ok"}, message])


def test_save_and_load_give_identical_encodings(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    for loaded in (Tokenizer.from_file(path), Tokenizer.from_file(tmp_path)):
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.sha256() == tokenizer.sha256()
        for text in ROUND_TRIP_TEXTS:
            assert loaded.encode(text) == tokenizer.encode(text)
        # the loaded tokenizer also treats literal specials as text
        assert min(loaded.encode("<|eos|>")) >= N_SPECIAL


def test_garbage_tokenizer_file_names_the_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("this is { not a tokenizer", encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(str(path))):
        Tokenizer.from_file(path)


def test_tokenizer_without_reserved_specials_names_the_path(tokenizer, tmp_path):
    data = json.loads(tokenizer.hf.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|pad|>"]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != "<|pad|>"}
    path = tmp_path / "nopad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(str(path)) + r".*<\|pad\|>"):
        Tokenizer.from_file(path)


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_hf_apply_chat_template_matches_render_chat(tokenizer, tmp_path, generation_prompt):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), chat_template=CHAT_TEMPLATE, bos_token="<|bos|>"
    )
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of 中国? 😀 12+7"},
        {"role": "assistant", "content": "  北京, with spaces\nand lines  "},
        {"role": "user", "content": "👨‍👩‍👧 thanks"},
    ]
    if not generation_prompt:
        messages = messages[:3]
    got = hf_ids(
        hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    )
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=generation_prompt)
    assert got == ids
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == tokenizer.decode(ids)
