"""Token shards on disk and the deterministic batches drawn from them.

A shard is a flat `.npy` array of token ids (uint16 when the vocabulary fits), documents
joined as <|bos|> text <|eos|>, memory-mapped at training time. Batches are a pure function
of (seed, step): training windows of seq_len + 1 tokens are shuffled per epoch with a fresh
offset, and global sample g = step * global_batch + i is window g of that order. Resuming at
a step therefore continues the exact data order, and any split of the global batch over
processes and accumulation steps sees the same samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lmforge.data.readers import corpus_files, read_texts
from lmforge.io import sha256_file, write_json_atomic
from lmforge.tokenizer import Tokenizer


def write_shard(
    path: Path, docs: Iterable[list[int]], bos_id: int, eos_id: int, vocab_size: int
) -> int:
    """Concatenate documents as bos + ids + eos into one .npy file (atomic); returns #tokens."""
    dtype = np.uint16 if vocab_size <= 65_536 else np.uint32
    parts = [np.asarray([bos_id, *ids, eos_id], dtype=dtype) for ids in docs]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return len(tokens)


def shard_key(corpus: Path, tokenizer: Tokenizer, val_fraction: float) -> dict:
    """What a set of shards was made from: the corpus files' and the tokenizer's hashes."""
    return {
        "corpus": str(Path(corpus).resolve()),
        "corpus_sha256": [sha256_file(f) for f in corpus_files(corpus)],
        "tokenizer_sha256": tokenizer.sha256(),
        "val_fraction": val_fraction,
    }


def shards_ready(data_dir: Path, key: dict) -> bool:
    """Whether data_dir holds complete shards made from exactly `key`."""
    meta = Path(data_dir) / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("key") == key


def shards_for(
    corpus: Path,
    tokenizer: Tokenizer,
    val_fraction: float,
    reuse: list[Path],
    own: Path,
    prepare: bool = True,
) -> Path:
    """The directory of this corpus's token shards for this tokenizer and split: the first of
    `reuse` that holds exactly them (an earlier stage tokenized the corpus already), else
    `own`, tokenized there when `prepare` is set. Under DDP only the main rank prepares; the
    others wait at a barrier, then map the same files."""
    key = shard_key(corpus, tokenizer, val_fraction)
    found = next((d for d in reuse if shards_ready(d, key)), None)
    if found is not None:
        return found
    if prepare:
        prepare_shards(corpus, tokenizer, own, val_fraction)
    return own


def prepare_shards(corpus: Path, tokenizer: Tokenizer, data_dir: Path, val_fraction: float) -> dict:
    """Tokenize a corpus (a file or a sharded directory) into train.npy and val.npy, unless
    shards of this exact corpus and tokenizer exist; every 1/val_fraction-th document goes
    to validation. meta.json is written last, so its presence means the shards are whole."""
    key = shard_key(corpus, tokenizer, val_fraction)
    if shards_ready(data_dir, key):
        return json.loads((data_dir / "meta.json").read_text())
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = list(read_texts(corpus))
    every = max(2, round(1 / val_fraction))
    ids = tokenizer.encode_batch(texts)
    val = [x for i, x in enumerate(ids) if i % every == every - 1]
    train = [x for i, x in enumerate(ids) if i % every != every - 1]
    args = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size)
    meta = {
        "key": key,
        "train_tokens": write_shard(data_dir / "train.npy", train, *args),
        "val_tokens": write_shard(data_dir / "val.npy", val, *args),
        "documents": len(texts),
    }
    write_json_atomic(data_dir / "meta.json", meta)
    return meta


def load_shard(path: Path) -> np.ndarray:
    """Memory-map a shard (never unpickles)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


class TokenBatches:
    """Deterministic (input, target) batches of shape (micro_batch, seq_len)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.tokens, self.seq_len, self.global_batch, self.seed = (
            tokens,
            seq_len,
            global_batch,
            seed,
        )
        self.n_windows = (len(tokens) - seq_len) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for seq_len {seq_len}")
        self._epoch, self._order, self._offset = -1, None, 0

    def _window_start(self, g: int) -> int:
        epoch, j = divmod(g, self.n_windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_windows)
            self._offset = int(rng.integers(self.seq_len))
        return self._offset + int(self._order[j]) * self.seq_len

    def _stack(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def micro_batch(self, step: int, micro: int, micro_batch: int, rank: int, world_size: int):
        """Micro-batch `micro` of this rank's share of the global batch at `step`."""
        first = step * self.global_batch + (micro * world_size + rank) * micro_batch
        return self._stack([self._window_start(g) for g in range(first, first + micro_batch)])

    def fixed_batch(self, index: int, micro_batch: int, rank: int, world_size: int):
        """Unshuffled windows for validation: batch `index`, this rank's share."""
        first = (index * world_size + rank) * micro_batch
        starts = [(g % self.n_windows) * self.seq_len for g in range(first, first + micro_batch)]
        return self._stack(starts)
