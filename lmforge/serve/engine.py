"""The serving engine: one thread that owns the model and decodes concurrent requests together.

Requests wait in a queue. The engine takes the oldest, gathers every waiting request that
samples with the same settings (temperature, top-k, top-p, seed) into one batch of up to
`max_batch` rows, and decodes them in one `decode_steps` loop, so that N concurrent users
cost one forward pass per token instead of N. Each row's text is streamed back as it grows.
Requests that arrive while a batch is decoding join the next one (static batching: simpler
than continuous batching, and enough for a feedback app whose answers are short). A request
whose longest prompt and budget would overflow the context with the batch's waits for the next.
A cancelled request (its client hung up) stops streaming at once, and its rows, like rows cut
by a stop text, leave the batch as finished rows do (`decode_steps`' `abandoned`); a batch
with no live request left stops.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.generate import decode_steps
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Event:
    """What the engine reports about one row: new text, or its end."""

    index: int  # the row within its request (0..n-1)
    delta: str = ""
    finish_reason: str | None = None  # "stop" | "length" when the row has ended
    text: str = ""  # the whole text, with the end
    tokens: int = 0  # completion tokens, with the end
    error: str | None = None


@dataclass(eq=False)  # a request is itself, not its fields: batches are chosen by identity
class Request:
    """n continuations of one prompt. `emit` is called from the engine thread for each Event."""

    prompt: list[int]
    n: int
    max_tokens: int
    sampling: Sampling
    emit: Callable[[Event], None]
    stop_texts: tuple[str, ...] = ()  # OpenAI `stop`: the text ends before the first of them
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """Incremental detokenisation of one row: text is emitted only once its bytes are whole,
    and never past a stop text."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.tokens: list[int] = []
        self.sent = ""
        self.finished = False

    def gone(self) -> bool:
        """Ended, or its client hung up: nothing more to decode or send."""
        return self.finished or self.request.cancelled.is_set()

    def grow(self, tokenizer: Tokenizer, token: int | None, end_reason: str | None) -> None:
        if token is not None:
            self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special=True)  # control tokens are not text
        for stop in self.request.stop_texts:
            if stop in text:
                text, end_reason = text[: text.index(stop)], "stop"
        if end_reason is None:
            # hold back an incomplete UTF-8 character, and a tail that may begin a stop text
            text = text.rstrip("\ufffd")
            hold = max(
                (
                    k
                    for s in self.request.stop_texts
                    for k in range(1, len(s))
                    if text.endswith(s[:k])
                ),
                default=0,
            )
            text = text[: len(text) - hold]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.request.emit(Event(self.index, delta=text[len(self.sent) :]))
            self.sent = text
        if end_reason is not None:
            self.finished = True
            self.request.emit(
                Event(self.index, finish_reason=end_reason, text=text, tokens=len(self.tokens))
            )


class Engine:
    """Owns the model on one thread; `submit` is safe from any thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = model.cfg.max_seq_len
        self.stop_ids = [tokenizer.end_id, tokenizer.eos_id]
        self.batches = 0  # decoded batches, and the rows in them: how much batching happened
        self.rows = 0
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} is more than the engine's batch ({self.max_batch})")
        if len(request.prompt) + request.max_tokens > self.context:
            raise ValueError(f"prompt + max_tokens is over the context ({self.context})")
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Request] | None:
        """The oldest waiting request and every other one that samples alike, up to max_batch rows."""
        if not self._waiting:
            first = self._queue.get()
            if first is None:
                return None
            self._waiting.append(first)
        while True:  # everything queued meanwhile joins the choice
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return None
            self._waiting.append(item)
        self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
        if not self._waiting:
            return []
        # rows are left-padded to the longest prompt and decode for the largest budget:
        # a request joins only while that still fits the model's context
        key, rows, width, steps, batch = self._waiting[0].sampling, 0, 0, 0, []
        for r in self._waiting:
            fits = max(width, len(r.prompt)) + max(steps, r.max_tokens) <= self.context
            # a seeded request owns its random generator, so that its seed reproduces it
            alone = key.seed is not None and bool(batch)
            if r.sampling == key and rows + r.n <= self.max_batch and fits and not alone:
                batch.append(r)
                rows += r.n
                width, steps = max(width, len(r.prompt)), max(steps, r.max_tokens)
        self._waiting = [r for r in self._waiting if r not in batch]
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                try:
                    self._decode(batch)
                except Exception as e:  # a failed batch must not take the server down
                    for request in batch:
                        request.emit(Event(0, error=f"generation failed: {e}"))

    def _decode(self, batch: list[Request]) -> None:
        rows = [_Row(r, i) for r in batch for i in range(r.n)]
        prompts = [r.prompt for r in batch for _ in range(r.n)]
        budgets = [r.max_tokens for r in batch for _ in range(r.n)]
        s = batch[0].sampling
        abandoned = torch.zeros(len(rows), dtype=torch.bool)  # rows no one waits for any more
        self.batches += 1
        self.rows += len(rows)
        steps = decode_steps(
            self.model,
            prompts,
            budgets,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_ids=self.stop_ids,
            pad_id=self.tokenizer.pad_id,
            seed=s.seed,
            abandoned=abandoned,
        )
        for step in steps:
            tokens, done = step.tokens.tolist(), step.done.tolist()
            for i, (row, token, finished) in enumerate(zip(rows, tokens, done)):
                if not row.gone():
                    if token in self.stop_ids:
                        row.grow(self.tokenizer, None, "stop")
                    else:
                        row.grow(self.tokenizer, token, "length" if finished else None)
                abandoned[i] = row.gone()
            if bool(abandoned.all()):
                steps.close()
                break
