"""Safe artifact files: atomic writes, safetensors only (never pickle), errors that name the file.

A model directory holds `model.safetensors`, `model.json` (its ModelConfig) and
`tokenizer.json`; it is what every stage writes and what `generate`, `chat` and later stages load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not fit; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, missing_hint: str) -> Any:
    """Parse a JSON file; a missing or malformed one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing ({missing_hint})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that a reader never sees a half-written file (see open_atomic)."""
    with open_atomic(path) as f:
        f.write(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    """JSON Lines, one record a line, written as `write_text_atomic` writes."""
    with open_atomic(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@contextmanager
def open_atomic(path: Path) -> Iterator[IO[str]]:
    """`write_text_atomic` for a file written in pieces (a corpus streamed to disk): it
    appears at `path` only once complete, and a failure leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class JsonlShards:
    """JSON Lines written as part-00000.jsonl, part-00001.jsonl ... of at most `shard_mb`
    each, under a temporary directory that replaces `directory` only once all are complete."""

    def __init__(self, directory: Path, shard_mb: float):
        self.directory, self.limit = Path(directory), int(shard_mb * 1e6)
        self.tmp = Path(
            tempfile.mkdtemp(dir=self.directory.parent, prefix=f".{self.directory.name}.")
        )
        self.file: IO[str] | None = None
        self.parts = self.size = 0

    def write(self, line: str) -> int:
        """Append one line; returns its size in bytes."""
        n = len(line.encode("utf-8"))
        if self.file is None or (self.size and self.size + n > self.limit):
            if self.file is not None:
                self.file.close()
            part = self.tmp / f"part-{self.parts:05d}.jsonl"
            # kept open across writes; closed by the next part or by __exit__
            self.file = open(part, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
            self.parts, self.size = self.parts + 1, 0
        self.file.write(line)
        self.size += n
        return n

    def __enter__(self) -> JsonlShards:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.replace(self.tmp, self.directory)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    """safetensors file written to a temp name, flushed, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
    _fsync(tmp)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; any damage becomes a CheckpointError naming the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({e})") from None


def tied_duplicates(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of a state dict whose tensor an earlier name already holds: tied weights, such
    as lm_head.weight with tied embeddings (in a model, or in a module list holding one)."""
    seen: set[int] = set()
    duplicates = set()
    for name, tensor in state.items():
        if tensor.numel() and tensor.data_ptr() in seen:
            duplicates.add(name)
        seen.add(tensor.data_ptr())
    return duplicates


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each tensor once, as HF)."""
    state = model.state_dict()
    duplicates = tied_duplicates(state)
    return {k: v for k, v in state.items() if k not in duplicates}


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(missing) - tied_duplicates(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def save_model_dir(directory: Path, model: Transformer, tokenizer: Tokenizer) -> None:
    """Write a self-contained model directory (weights, config, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(model_state(model), directory / "model.safetensors")
    write_json_atomic(directory / "model.json", model.cfg.model_dump())
    tokenizer.save(directory / "tokenizer.json")


def load_model_dir(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer]:
    """Load a model directory written by `save_model_dir`, in eval mode on `device`."""
    directory = Path(directory)
    cfg_path = directory / "model.json"
    try:
        cfg = ModelConfig.model_validate(json.loads(cfg_path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(
            f"{cfg_path}: file is missing (is {directory} a model directory?)"
        ) from None
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid model config ({e})") from None
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    model = Transformer(cfg)
    weights = directory / "model.safetensors"
    load_model_state(model, load_tensors(weights), weights)
    return model.to(device).eval(), tokenizer
