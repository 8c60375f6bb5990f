"""The rollout engine of online RL: sample G replies per prompt with the KV cache, keeping
each token's log-probability from the same pass, and lay them out for a training step.

Sampling is at temperature 1 with no top-k/top-p by default, so the recorded log-probs are
the policy's own and KL estimates on them are right. A reply stops at the end token (which
is part of what the policy is trained on: it chose to stop), or at the pretraining document
end, which a model that loses the chat format emits; one that runs out of tokens is marked
`truncated`, and the stage decides what it is worth.

Around the steps, what GRPO and PPO share: `rl_steps` (the learning rate and time limit of
each step) and `checkpoint_step` (`train_utils.start_log` resumes from its checkpoints).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import OnlineRL
from lmforge.eval.chat import chat_prompts
from lmforge.generate import sample_completions
from lmforge.losses import IGNORE_INDEX
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import lr_at, save_checkpoint


@dataclass
class Rollout:
    record: int  # index of the prompt record
    prompt: list[int]
    tokens: list[int]  # the reply, with its end token when it stopped
    logprobs: list[float]  # per reply token, under the sampling distribution
    text: str  # the reply decoded, without the end token
    truncated: bool


def rollout(
    policy: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    indices: list[int],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[Rollout]:
    """`group_size` replies to each of records[i] for i in `indices`, in one batched call
    (grouped by prompt: the first G rows answer the first prompt). The token budget is cut
    to what the longest prompt leaves of the context."""
    conversations = [records[i]["messages"] for i in indices]
    prompts, budget = chat_prompts(policy, tokenizer, conversations, max_new_tokens)
    policy.eval()
    completions = sample_completions(
        policy,
        [p for p in prompts for _ in range(group_size)],
        budget,
        temperature=temperature,
        # a reply that emits the pretraining document end has left the chat; it stops too
        stop_ids=[tokenizer.end_id, tokenizer.eos_id],
        pad_id=tokenizer.pad_id,
        seed=seed,
        with_logprobs=True,
    )
    out = []
    for n, c in enumerate(completions):
        i = n // group_size
        reply = c.tokens[:-1] if c.stopped else c.tokens
        out.append(
            Rollout(
                indices[i], prompts[i], c.tokens, c.logprobs, tokenizer.decode(reply), not c.stopped
            )
        )
    return out


def training_batch(
    rollouts: list[Rollout], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x (B, T), targets y (B, T) with -100 off the reply, and the sampling
    log-probs (B, T) at the reply's target positions (0 elsewhere); rows right-padded."""
    width = max(len(r.prompt) + len(r.tokens) - 1 for r in rollouts)
    x = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    y = torch.full((len(rollouts), width), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros((len(rollouts), width))
    for b, r in enumerate(rollouts):
        ids = r.prompt + r.tokens
        x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        start = len(r.prompt) - 1  # the position whose target is the reply's first token
        y[b, start : start + len(r.tokens)] = torch.tensor(r.tokens)
        old[b, start : start + len(r.tokens)] = torch.tensor(r.logprobs)
    return x, y, old


def update_passes(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    n_rows: int,
    iterations: int,
    minibatches: int,
    grad_clip: float,
    step_loss: Callable[[list[int], int], tuple[torch.Tensor, dict[str, float]]],
) -> dict[str, float]:
    """`iterations` passes over the rollout batch's `n_rows` rows, each in `minibatches`
    optimiser steps with gradient clipping. `step_loss(rows, k)` returns the k-th step's
    loss on those rows and its figures; returns each figure averaged over the steps."""
    size = math.ceil(n_rows / minibatches)
    sums: dict[str, float] = {}
    k = 0
    for _ in range(iterations):
        for start in range(0, n_rows, size):
            loss, figures = step_loss(list(range(start, min(n_rows, start + size))), k)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in {"loss": loss.item(), **figures}.items():
                sums[name] = sums.get(name, 0.0) + value
            k += 1
    return {name: round(total / k, 5) for name, total in sums.items()}


def checkpoint_step(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    section: OnlineRL,
    state: dict[str, Any],
) -> None:
    """After every `section.checkpoint_every`-th step and the last (by count, or because
    state["elapsed_seconds"] has passed `section.time_limit`), a checkpoint holding `state`
    (for `start_log(resume=True)`)."""
    out_of_time = section.time_limit and state["elapsed_seconds"] > section.time_limit
    if step % section.checkpoint_every == 0 or step == section.steps or out_of_time:
        save_checkpoint(out / "checkpoints", step, model, optimizer, state, section.keep_last)


def rl_steps(
    section: OnlineRL, optimizer: torch.optim.Optimizer, done: int = 0, elapsed: float = 0.0
) -> Iterator[tuple[int, float]]:
    """Steps done+1 .. section.steps (fewer when `section.time_limit` seconds of training,
    `elapsed` of them before a resume, run out), each with its learning rate (warmup, then
    cosine to min_lr_ratio) set on the optimiser."""
    start = time.perf_counter() - elapsed
    for step in range(done + 1, section.steps + 1):
        if section.time_limit and time.perf_counter() - start > section.time_limit:
            return
        lr = lr_at(step - 1, section.steps, section.lr, section.warmup_steps, section.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        yield step, lr
