"""SFT data: conversation records to (ids, loss mask) examples, and deterministic batches.

Records (ARCHITECTURE.md) are `{"messages": [{"role", "content"}, ...]}`, `{"prompt",
"response"}` or Alpaca `{"instruction", "input", "output"}`; a malformed one raises a
DataError naming file:line (`file:[i]` for element i of a JSON array). Rendering uses the
tokenizer's chat template, so only assistant turns and their closing `<|end|>` carry loss.
A prompt already wrapped in the Alpaca prompt template is unwrapped first (`unwrap_alpaca`).

Nothing is cut silently. A conversation longer than `max_len` keeps its leading turns up to
the last assistant reply (with its `<|end|>`) that fits whole; if not even the first reply
fits, the example is dropped and its file:line reported. Cutting inside a prompt would teach
answers to questions the model never saw, and cutting inside an answer would teach it to stop
without `<|end|>`.

Batches are a pure function of (seed, step), like `data/shards.py`: each epoch is a fresh
permutation drawn from (seed, epoch), and global sample g = step * global_batch + i is item
g of that order, so a resumed run continues the exact data order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.readers import DataError, read_records
from lmforge.losses import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")

# Stanford Alpaca's two prompt templates (without and with an input), as datasets such as
# mosaicml/dolly_hhrlhf ship them: the exact preamble sentence, then the three markers.
ALPACA_PREAMBLE = "Below is an instruction that describes a task"
_ALPACA_WRAPPED = re.compile(
    rf"{ALPACA_PREAMBLE}\. "
    r"Write a response that appropriately completes the request\.\n\n"
    r"### Instruction:\n(?P<instruction>.+?)\n\n"
    r"### Response:\s*"
    r"|"
    rf"{ALPACA_PREAMBLE}, paired with an input that provides further context\. "
    r"Write a response that appropriately completes the request\.\n\n"
    r"### Instruction:\n(?P<instruction_with_input>.+?)\n\n"
    r"### Input:\n(?P<input>.+?)\n\n"
    r"### Response:\s*",
    re.DOTALL,
)


def alpaca_prompt(instruction: str, extra: str) -> str:
    """The user turn of an Alpaca record: the instruction, then its input if any."""
    return f"{instruction}\n\n{extra}" if extra else instruction


def unwrap_alpaca(prompt: str, where: str) -> str:
    """The plain instruction (and input) of a prompt wrapped in the Alpaca prompt template;
    any other prompt unchanged.

    Our chat template already marks the user turn and the reply. Left wrapped, the model
    would learn the foreign preamble and `### Response:` inside the user turn, and expect
    them at inference, where users never write them. Only the whole template matches (the
    preamble sentence word for word, then `### Instruction:`, optionally `### Input:`, and a
    final `### Response:`), so a prompt that merely mentions these markers is left alone.
    A prompt that opens with the preamble but is not the whole template (an edited template,
    or a response begun inside the prompt) raises, rather than being trained on wrapped.
    """
    match = _ALPACA_WRAPPED.fullmatch(prompt)
    if match is None:
        if prompt.startswith(ALPACA_PREAMBLE):
            raise DataError(
                f"{where}: prompt opens with the Alpaca template's preamble but is not the "
                "whole template (preamble, ### Instruction:, [### Input:,] ### Response:)"
            )
        return prompt
    if match["instruction"] is not None:
        return match["instruction"]
    return alpaca_prompt(match["instruction_with_input"], match["input"])


def checked_messages(messages, where: str) -> list[dict]:
    """`messages` if it is a non-empty list of {role in ROLES, content: str}, else a
    DataError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for n, m in enumerate(messages):
        if not (
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: message {n} needs role in {list(ROLES)} and string content")
    return messages


def to_messages(record: dict, where: str) -> list[dict]:
    """One SFT record in any supported format as a message list (checked)."""
    if "messages" in record:
        messages = checked_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
    elif "instruction" in record and "output" in record:
        prompt, extra, response = record["instruction"], record.get("input"), record["output"]
        if not isinstance(prompt, str) or not isinstance(extra, str | None):
            raise DataError(f"{where}: 'instruction' and 'input' must be strings")
        prompt = alpaca_prompt(prompt, extra or "")
    else:
        raise DataError(
            f"{where}: expected 'messages', 'prompt'+'response' or "
            f"'instruction'+'output' (got keys {sorted(record)})"
        )
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: prompt and response must be strings")
    user = unwrap_alpaca(prompt, where)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def read_conversations(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(file:line, messages) of every record of an SFT file."""
    return [(where, to_messages(record, where)) for where, record in read_records(path)]


@dataclass
class Example:
    where: str
    ids: list[int]
    mask: list[bool]
    segments: list[int] | None = None  # packed rows: the conversation each token belongs to


@dataclass
class Encoded:
    examples: list[Example]
    dropped: list[str]  # file:line of conversations whose first reply does not fit
    shortened: list[str]  # file:line of conversations that lost trailing turns


def fit(ids: list[int], mask: list[bool], end_id: int, max_len: int) -> int:
    """The longest prefix length <= max_len that ends on the `<|end|>` of an assistant turn
    (the whole conversation if it fits); 0 when not even the first reply fits."""
    if len(ids) <= max_len:
        return len(ids)
    ends = [i + 1 for i in range(max_len) if mask[i] and ids[i] == end_id]
    return ends[-1] if ends else 0


def encode(
    conversations: Iterable[tuple[str, list[dict]]], tokenizer: Tokenizer, max_len: int
) -> Encoded:
    """Render every conversation to ids and loss mask, fitted to max_len tokens."""
    out = Encoded([], [], [])
    for where, messages in conversations:
        try:
            ids, mask = tokenizer.render_chat(messages)
        except TokenizerError as e:  # e.g. a model's own template that cannot render it
            raise DataError(f"{where}: {e}") from None
        n = fit(ids, mask, tokenizer.end_id, max_len)
        if n == 0:
            out.dropped.append(where)
            continue
        if n < len(ids):
            out.shortened.append(where)
        out.examples.append(Example(where, ids[:n], mask[:n]))
    return out


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most max_len tokens (greedily, in
    order), recording each token's conversation in `segments`, so that far fewer tokens are
    padding. `collate` turns the segments into a mask that keeps attention inside each
    conversation and positions that restart at 0 for each, so a packed conversation is
    computed exactly as it would be alone."""
    rows: list[Example] = []
    for e in examples:
        last = rows[-1] if rows else None
        if last is not None and len(last.ids) + len(e.ids) <= max_len:
            last.segments += [last.segments[-1] + 1] * len(e.ids)
            last.ids, last.mask = last.ids + e.ids, last.mask + e.mask
        else:
            rows.append(Example(e.where, list(e.ids), list(e.mask), [0] * len(e.ids)))
    return rows


def collate(
    examples: list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs and targets (B, longest - 1): inputs padded with pad_id, targets the next
    tokens, IGNORE_INDEX where the next token carries no loss or is padding. The third item
    is the inputs' segment ids (B, longest - 1) for packed examples (padding is a segment of
    its own), else None; `segment_attention` makes the model's mask and positions from it."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    packed = examples[0].segments is not None
    segments = torch.full((len(examples), width), -1, dtype=torch.long) if packed else None
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, : len(ids) - 1] = torch.where(torch.tensor(e.mask[1:]), ids[1:], IGNORE_INDEX)
        if packed:
            segments[row, : len(ids) - 1] = torch.tensor(e.segments[:-1])
    return x, y, segments


def segment_attention(segments: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `mask` (B, 1, T, T) and rotary `positions` (B, T) of packed rows: a token attends
    to the earlier tokens of its own segment only, and positions count from each segment's
    start. Every query sees at least itself, so no attention row is empty."""
    T = segments.size(1)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a segment starts here
    index = torch.arange(T, device=segments.device).expand_as(segments)
    start = torch.where(new, index, 0).cummax(dim=1).values  # each token's segment start
    positions = index - start
    return {"mask": (same & causal)[:, None], "positions": positions}


class SFTBatches:
    """Deterministic shuffled micro-batches of examples; see the module docstring."""

    def __init__(self, examples: list[Example], global_batch: int, seed: int, pad_id: int):
        if not examples:
            raise ValueError("no SFT examples to train on")
        self.examples, self.global_batch, self.seed, self.pad_id = (
            examples,
            global_batch,
            seed,
            pad_id,
        )
        self._epoch, self._order = -1, np.arange(0)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.examples) // self.global_batch)

    def _item(self, g: int) -> Example:
        epoch, j = divmod(g, len(self.examples))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self.examples[int(self._order[j])]

    def micro_batch(self, step: int, micro: int, micro_batch: int, rank: int, world_size: int):
        """Micro-batch `micro` of this rank's share of the global batch at `step`."""
        first = step * self.global_batch + (micro * world_size + rank) * micro_batch
        return collate([self._item(g) for g in range(first, first + micro_batch)], self.pad_id)

    def fixed_batches(self, micro_batch: int, rank: int, world_size: int):
        """Every example once, unshuffled, this rank's share, in micro-batches (validation)."""
        mine = self.examples[rank::world_size]
        for i in range(0, len(mine), micro_batch):
            yield collate(mine[i : i + micro_batch], self.pad_id)
