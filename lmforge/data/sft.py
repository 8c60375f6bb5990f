"""SFT data: conversation records to (ids, loss mask) examples, and deterministic batches.

Records (ARCHITECTURE.md) are `{"messages": [{"role", "content"}, ...]}`, `{"prompt",
"response"}` or Alpaca `{"instruction", "input", "output"}`; a malformed one raises a
DataError naming file:line. Rendering uses the tokenizer's chat template, so only assistant
turns and their closing `<|end|>` carry loss.

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

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.readers import DataError, read_records
from lmforge.losses import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def to_messages(record: dict, where: str) -> list[dict]:
    """One SFT record in any supported format as a message list (checked)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for n, m in enumerate(messages):
            if not (
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"{where}: message {n} needs role in {list(ROLES)} and string content"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
    elif "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string")
        prompt = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
        response = record["output"]
    else:
        raise DataError(
            f"{where}: expected 'messages', 'prompt'+'response' or "
            f"'instruction'+'output' (got keys {sorted(record)})"
        )
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: prompt and response must be strings")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def read_conversations(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(file:line, messages) of every record of an SFT file."""
    return [(where, to_messages(record, where)) for where, record in read_records(path)]


@dataclass
class Example:
    where: str
    ids: list[int]
    mask: list[bool]


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
        ids, mask = tokenizer.render_chat(messages)
        n = fit(ids, mask, tokenizer.end_id, max_len)
        if n == 0:
            out.dropped.append(where)
            continue
        if n < len(ids):
            out.shortened.append(where)
        out.examples.append(Example(where, ids[:n], mask[:n]))
    return out


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, longest - 1): inputs padded with pad_id, targets the next
    tokens, IGNORE_INDEX where the next token carries no loss or is padding."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, : len(ids) - 1] = torch.where(torch.tensor(e.mask[1:]), ids[1:], IGNORE_INDEX)
    return x, y


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
