"""Byte-level BPE tokenizer, reserved special tokens and the chat template.

The BPE itself is Hugging Face `tokenizers` (Rust). This module adds what the pipeline
relies on:

- the special tokens of ARCHITECTURE.md at fixed ids 0..6, with pad distinct from eos;
- an imported tokenizer (`lmforge import`) keeps its own special ids, read from the Hugging
  Face `tokenizer_config.json` saved beside its tokenizer.json (see `Tokenizer`);
- text never turns into a special token: "<|eos|>" typed by a user is plain text, and
  special ids are only ever inserted by code (`encode_special_tokens = True`) or written by
  an imported chat template itself, never by the messages it renders;
- exact round trips: `decode(encode(s)) == s` for any str, and `decode_bytes(encode_bytes(b))
  == b` for any bytes, valid UTF-8 or not;
- the chat template, rendered to ids with the loss mask of SFT (assistant turns only, with
  their closing `<|end|>`), and the same template as Jinja for `apply_chat_template`;
- an imported tokenizer's own chat template (ChatML, Llama 3 ...), rendered with Jinja as
  transformers renders it, to the same ids as its `apply_chat_template` and a loss mask of the
  same kind: each reply and the template's end-of-turn token after it (`Tokenizer.render_chat`).
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# the special tokens a Hugging Face chat template sees as variables, as in transformers
TEMPLATE_TOKENS = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
]
# private-use characters wrapped around special-token text inside messages before a template
# renders them (transformers' markers for `sanitize_control_tokens`), so that only the
# specials the template itself writes become special ids
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# an assistant reply whose rendering shows what the template writes after a reply
_PROBE_REPLY = "lmforge probe reply"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte maps to one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


class TokenizerError(ValueError):
    """A tokenizer file is missing or not a usable lmforge tokenizer."""


def compile_chat_template(source: str) -> jinja2.Template:
    """A Hugging Face chat template, compiled as transformers' `apply_chat_template` compiles
    it (same whitespace handling, loop controls and helpers), so that it renders the same
    text. The sandbox matters: a template is code that comes with a downloaded checkpoint."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which transformers' does not
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with reserved specials.

    Special ids come from one of two places. A tokenizer trained by lmforge (`config` None)
    must hold SPECIAL_TOKENS at ids 0..6. An imported one brings its own specials at its own
    ids, so the ids cannot be constants: `config` is its Hugging Face `tokenizer_config.json`
    (the file transformers itself reads them from, kept beside tokenizer.json by `save`), and
    bos/eos/pad are looked up from its `bos_token`/`eos_token`/`pad_token`. Where one is
    missing, eos stands in (Qwen2 has no bos, Llama no pad); pad only fills masked positions,
    so an imported pad may equal eos.

    Chats: an imported tokenizer's own `chat_template` (the config's, as transformers keeps
    it) renders them, and `end_id` is the special token that template writes right after a
    reply (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), where generation stops. Without a
    template, lmforge's chat markers (`<|user|>` ... `<|end|>`) are used where the vocabulary
    has them; without either, `render_chat` refuses and a turn ends at eos.
    """

    def __init__(self, hf: HFTokenizer, config: dict | None = None):
        if config is None:
            for i, tok in enumerate(SPECIAL_TOKENS):
                if hf.token_to_id(tok) != i:
                    raise TokenizerError(f"special token {tok} must have id {i}")
        hf.encode_special_tokens = True  # user text can never become a special token
        self.hf, self.config = hf, config
        eos_id = self._special_id("eos_token", EOS)
        if eos_id is None:
            raise TokenizerError("tokenizer_config.json: eos_token is not set")
        bos_id, pad_id = self._special_id("bos_token", BOS), self._special_id("pad_token", PAD)
        self.eos_id = eos_id
        self.bos_id = eos_id if bos_id is None else bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.system_id, self.user_id, self.assistant_id, end_id = (
            hf.token_to_id(t) for t in (SYSTEM, USER, ASSISTANT, END)
        )
        self.end_id = eos_id if end_id is None else end_id
        has_chat = None not in (self.system_id, self.user_id, self.assistant_id, end_id)
        self.role_ids: dict[str, int] = (
            {role: hf.token_to_id(tok) for role, tok in ROLE_TOKENS.items()} if has_chat else {}
        )
        # added special tokens are stored as text, not in the byte alphabet
        self.special_ids = frozenset(
            i for i, t in hf.get_added_tokens_decoder().items() if t.special
        )
        self._byte_ids = [hf.token_to_id(BYTE_TO_UNICODE[b]) for b in range(256)]
        template = (config or {}).get("chat_template")
        if isinstance(template, list):  # named templates (older transformers): the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        self.chat_template: jinja2.Template | None = None
        if template:
            self._use_chat_template(template)

    def _config_token(self, key: str) -> str | None:
        """The text of special token `key` of the imported config (None where it is unset)."""
        token = self.config.get(key)
        if isinstance(token, dict):  # an AddedToken written out by transformers
            token = token.get("content")
        return token

    def _special_id(self, key: str, default: str) -> int | None:
        """The id of special token `key` of the config (lmforge's `default` without one)."""
        if self.config is None:
            return self.hf.token_to_id(default)
        token = self._config_token(key)
        if token is None:
            return None
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise TokenizerError(
                f"tokenizer_config.json: {key} {token!r} is not in tokenizer.json's vocabulary"
            )
        return tid

    def _use_chat_template(self, source: str) -> None:
        """Render chats with the imported template `source`. It writes its special tokens as
        text, so a twin of the BPE that recognises special-token text encodes its renders;
        `end_id` becomes the first special token it writes after a reply's content (eos where
        it writes none)."""
        try:
            self.chat_template = compile_chat_template(source)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"tokenizer_config.json: chat_template: {e}") from None
        self._template_tokens = {
            key: token for key in TEMPLATE_TOKENS if (token := self._config_token(key)) is not None
        }
        self._template_hf = HFTokenizer.from_str(self.hf.to_str())
        self._template_hf.encode_special_tokens = False
        specials = sorted((self.hf.id_to_token(i) for i in self.special_ids), key=len, reverse=True)
        pattern = "|".join(map(re.escape, specials)) or "(?!)"  # longest first; (?!): none
        self._special_text = re.compile(pattern)
        self._marked = re.compile(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
        text = self._render_text(probe, add_generation_prompt=False)
        if _PROBE_REPLY not in text:
            raise TokenizerError("tokenizer_config.json: chat_template drops a reply's content")
        after = text.rindex(_PROBE_REPLY) + len(_PROBE_REPLY)
        ids, starts = self._encode_rendered(text)
        self.end_id = next(
            (i for i, at in zip(ids, starts) if at >= after and i in self.special_ids), self.eos_id
        )

    def hf_config(self) -> dict:
        """This tokenizer's `tokenizer_config.json` for transformers (lmforge's, or the
        imported one it came with)."""
        return self.config if self.config is not None else hf_tokenizer_config()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    # ---- files ----------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, with the tokenizer_config.json beside it where there is one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"tokenizer not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error is opaque: name the file
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        config_path = path.with_name("tokenizer_config.json")
        config = None
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_path}: not valid JSON ({e})") from None
        try:
            return cls(hf, config)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically, and tokenizer_config.json beside it when this
        tokenizer's special ids come from one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.hf.save(str(tmp))
        tmp.replace(path)
        if self.config is not None:
            config_path = path.with_name("tokenizer_config.json")
            tmp = config_path.with_name(config_path.name + ".tmp")
            tmp.write_text(json.dumps(self.config, indent=2, ensure_ascii=False), "utf-8")
            tmp.replace(config_path)

    def sha256(self) -> str:
        """Fingerprint of the whole tokenizer (vocabulary, merges, pipeline)."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    # ---- text ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; no special token is added or recognised."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [i for i in ids if not (skip_special and i in self.special_ids)]
        return self.hf.decode(ids, skip_special_tokens=False)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes to ids: valid UTF-8 runs go through BPE, other bytes map to byte tokens."""
        ids: list[int] = []
        while data:
            try:
                ids += self.encode(data.decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                ids += self.encode(data[: e.start].decode("utf-8"))
                ids += [self._byte_ids[b] for b in data[e.start : e.end]]
                data = data[e.end :]
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to the exact bytes they stand for (special tokens as their UTF-8 text)."""
        out = bytearray()
        for i in ids:
            token = self.hf.id_to_token(i)
            if i in self.special_ids:
                out += token.encode("utf-8")
            else:
                out += bytes(UNICODE_TO_BYTE[c] for c in token)
        return bytes(out)

    # ---- chat ----------------------------------------------------------------------
    def render_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Messages to (ids, loss_mask): only assistant turns and the end-of-turn token that
        closes each (`end_id`) carry loss. A tokenizer with its own chat template renders
        with it (`_render_template`), else with lmforge's markers."""
        if self.chat_template is None and not self.role_ids:
            raise TokenizerError(
                "this tokenizer has no chat template and no lmforge chat markers "
                f"({SYSTEM} {USER} {ASSISTANT} {END}), so it cannot render a chat"
            )
        for n, m in enumerate(messages):
            role = m.get("role")
            known = isinstance(role, str) if self.chat_template else role in self.role_ids
            if not known or not isinstance(m.get("content"), str):
                roles = "a str role" if self.chat_template else f"role in {list(self.role_ids)}"
                raise ValueError(f"message {n}: needs {roles} and str content")
        if self.chat_template is not None:
            return self._render_template(messages, add_generation_prompt)
        ids, mask = [self.bos_id], [False]
        for m in messages:
            body = self.encode(m["content"]) + [self.end_id]
            ids += [self.role_ids[m["role"]]] + body
            mask += [False] + [m["role"] == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(False)
        return ids, mask

    def _render_template(
        self, messages: Sequence[dict], add_generation_prompt: bool
    ) -> tuple[list[int], list[bool]]:
        """render_chat with the imported template. A template gives text, not turns, so the
        mask comes from renders of prefixes: assistant message i starts where messages[:i]
        with the generation prompt end, and its loss runs from there through the first
        `end_id` of the text that messages[:i + 1] end with. Each prefix must render as the
        start of the whole conversation, or the template is refused for SFT."""
        marked = [{key: self._mark(value) for key, value in m.items()} for m in messages]
        text = self._render_text(marked, add_generation_prompt)
        ids, starts = self._encode_rendered(text)
        mask = [False] * len(ids)
        for i, m in enumerate(marked):
            if m["role"] != "assistant":
                continue
            begin = self._prefix_length(marked[:i], True, text)
            stop = self._prefix_length(marked[: i + 1], False, text)
            first = k = bisect_left(starts, begin)
            while k < len(ids) and starts[k] < stop and ids[k] != self.end_id:
                k += 1
            if k == len(ids) or starts[k] >= stop:
                raise TokenizerError(
                    f"message {i}: the chat template ends this reply without "
                    f"{self.hf.id_to_token(self.end_id)!r}, so a reply's end cannot be taught"
                )
            mask[first : k + 1] = [True] * (k + 1 - first)
        return ids, mask

    def _render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The chat template's text, rendered with the variables transformers passes."""
        try:
            return self.chat_template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_tokens,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat_template: {e}") from None

    def _prefix_length(
        self, messages: Sequence[dict], add_generation_prompt: bool, full: str
    ) -> int:
        """The length of the render of `messages`, checked to be the start of `full`."""
        text = self._render_text(messages, add_generation_prompt)
        if not full.startswith(text):
            what = f"the first {len(messages)} messages" + (
                " with the generation prompt" if add_generation_prompt else ""
            )
            raise TokenizerError(
                f"the chat template is not prefix-stable: it renders {what} as text that does "
                "not begin its render of the whole conversation, so the assistant's tokens "
                "(the SFT loss mask) cannot be found"
            )
        return len(text)

    def _mark(self, value):
        """A message field with each special token's text in it wrapped in markers, so that
        it stays text (markers already in it are dropped: none can be forged)."""
        if not isinstance(value, str):
            return value
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return self._special_text.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)

    def _encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of a rendered chat, and where in `text` each token starts. Special-token
        text the template wrote becomes those ids; marked text from the messages (`_mark`)
        is encoded as plain text on its own, and a stray marker is dropped: transformers'
        `apply_chat_template(..., sanitize_control_tokens=True)`, which for messages without
        special-token text is its default encoding of the whole text."""
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for m in [*self._marked.finditer(text), None]:
            end = len(text) if m is None else m.start()
            encoding = self._template_hf.encode(text[pos:end], add_special_tokens=False)
            ids += encoding.ids
            starts += [pos + a for a, _ in encoding.offsets]
            if m is not None:
                plain = self.encode(m.group(1) or "")
                ids += plain
                starts += [m.start()] * len(plain)
                pos = m.end()
        return ids, starts


def build_untrained() -> HFTokenizer:
    """The empty byte-level BPE pipeline.

    Before the GPT-2 byte mapping, every Han character and every digit stands alone. Chinese
    has no spaces, so without this a merge such as "是维" would straddle the end of a prompt
    ("...的首都是") and its answer, and the prompt would end in a token the model rarely saw
    there; single digits make arithmetic regular.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{Han}\u3000-\u303f\uff00-\uffef]"), "isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts`; specials take ids 0..6, all 256 bytes are in the vocab."""
    hf = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def hf_tokenizer_config() -> dict:
    """`tokenizer_config.json` for transformers, carrying the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
    }
