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

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigError, OnlineRL
from lmforge.eval.chat import chat_prompts
from lmforge.generate import distinct_rows, left_pad, sample_completions
from lmforge.losses import IGNORE_INDEX
from lmforge.model import Transformer
from lmforge.model.transformer import Kept
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import (
    Dist,
    all_reduce_sum,
    autocast_dtype,
    console,
    gather_ints,
    lr_at,
    save_checkpoint,
    sum_gradients_over_ranks,
    weighted_mean_over_ranks,
    world_size,
)


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
    seed: int | Sequence[int],
) -> list[Rollout]:
    """`group_size` replies to each of records[i] for i in `indices`, in one batched call
    (grouped by prompt: the first G rows answer the first prompt); `seed` one for the batch
    or one per reply (`generate.decode_steps`). The token budget is cut to what the longest
    prompt leaves of the context."""
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


def fitting(
    records: list[dict], tokenizer: Tokenizer, policy: Transformer, max_new_tokens: int
) -> tuple[list[dict], int]:
    """The records whose prompt leaves `max_new_tokens` in the model's context, and how many
    did not (GSM8K questions can outgrow a small model's context). With only these, `rollout`
    (and the held-out evaluation) never cuts the budget, so a reply's length does not depend
    on the rest of its batch (under torchrun, the rank's slice)."""
    room = policy.cfg.max_seq_len - max_new_tokens
    kept = [
        r
        for r in records
        if len(tokenizer.render_chat(r["messages"], add_generation_prompt=True)[0]) <= room
    ]
    return kept, len(records) - len(kept)


def check_prompt_split(name: str, section: OnlineRL) -> None:
    """Refuse a step's prompts that do not split evenly over torchrun's processes (each rank
    samples its own slice of them), naming the key."""
    if section.prompts_per_step % world_size():
        raise ConfigError(
            f"{name}.prompts_per_step {section.prompts_per_step} does not split evenly over "
            f"the {world_size()} processes: set it to a multiple of {world_size()}"
        )


def my_prompts(prompts_per_step: int, d: Dist) -> slice:
    """This rank's slice of a step's prompts (all of them in one process)."""
    share = prompts_per_step // d.world_size
    return slice(d.rank * share, (d.rank + 1) * share)


@dataclass
class RankRows:
    """Where a rank's rollouts to learn from sit in a step's whole batch under torchrun:
    rows offset .. offset + n - 1 of `total` (None: the rank's own are the whole batch),
    every reply padded to `width` (the longest of every rank's)."""

    offset: int = 0
    total: int | None = None
    width: int = 0


def rank_rows(kept: list[Rollout], d: Dist) -> RankRows:
    """Every rank's `RankRows` for its `kept` rollouts, from one gather."""
    longest = max((len(r.tokens) for r in kept), default=0)
    counts = gather_ints([len(kept), longest], d)
    sizes = [n for n, _ in counts]
    return RankRows(sum(sizes[: d.rank]), sum(sizes), max(w for _, w in counts))


def reply_seeds(seed: int, step: int, first: int, n: int) -> list[int]:
    """The sampling seeds of replies first .. first + n - 1 of a step's batch: each reply's
    random numbers are its own, so a torchrun job draws what one process draws."""
    return [
        ((seed * 1_000_003 + step) * 1_000_003 + row) % 2**63 for row in range(first, first + n)
    ]


@dataclass
class ReplyBatch:
    """Rollouts laid out for a training step, each distinct prompt once: the G replies of a
    group attend to one computation of their prompt (`Transformer.continue_prefixes`), and
    logits are computed only where they predict a reply token."""

    prompts: torch.Tensor  # (P, Tp) the distinct prompts, left-padded
    prompt_valid: torch.Tensor  # (P, Tp) True on their real tokens
    rows: torch.Tensor  # (B,) the prompt of each reply
    inputs: torch.Tensor  # (B, Tr - 1) the replies without their last token, right-padded
    targets: torch.Tensor  # (B, Tr) the replies, -100 past each one's end
    old: torch.Tensor  # (B, Tr) the sampling log-probs of the targets (0 past the end)

    def to(self, device: torch.device) -> ReplyBatch:
        return ReplyBatch(*(t.to(device) for t in vars(self).values()))


def reply_batch(rollouts: list[Rollout], pad_id: int, width: int = 0) -> ReplyBatch:
    """The rollouts' `ReplyBatch`, replies padded to the longest or to `width` if wider
    (what a rank pads to under torchrun: the longest of every rank's); prompts are told
    apart by their tokens."""
    firsts, rows = distinct_rows([r.prompt for r in rollouts])
    prompts, valid = left_pad([rollouts[b].prompt for b in firsts], pad_id, "cpu")
    width = max([width, *(len(r.tokens) for r in rollouts)])
    targets = torch.full((len(rollouts), width), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros((len(rollouts), width))
    for b, r in enumerate(rollouts):
        targets[b, : len(r.tokens)] = torch.tensor(r.tokens)
        old[b, : len(r.tokens)] = torch.tensor(r.logprobs)
    inputs = targets[:, :-1].masked_fill(targets[:, :-1] == IGNORE_INDEX, pad_id)
    return ReplyBatch(prompts, valid, torch.tensor(rows), inputs, targets, old)


def reply_hidden(
    model: Transformer, batch: ReplyBatch, mb: list[int] | None = None
) -> torch.Tensor:
    """The final hidden states (b, Tr, C) that predict each reply token of the rows `mb`
    (default: all), each prompt computed once; zeros past each reply's end, where the model
    computes nothing but attention (`Transformer.hidden_states`' `keep`)."""
    rows = batch.rows if mb is None else batch.rows[mb]
    inputs = batch.inputs if mb is None else batch.inputs[mb]
    targets = batch.targets if mb is None else batch.targets[mb]
    used, local = torch.unique(rows, return_inverse=True)
    # input position t predicts reply token t + 1: wanted while that token is real
    keep = targets[:, 1:] != IGNORE_INDEX
    return model.continue_prefixes(
        batch.prompts[used], batch.prompt_valid[used], inputs, local, keep
    )


def reply_logprobs(
    model: Transformer,
    batch: ReplyBatch,
    mb: list[int] | None = None,
    temperature: float = 1.0,
    hidden: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probabilities (b, Tr) of the reply tokens of rows `mb` (default: all) under
    softmax(logits / temperature), 0 past each reply's end, from their final hidden states
    (`reply_hidden`, or `hidden` if given); with `with_entropy`, also each position's entropy
    (b, Tr; no gradient), else None. Logits are computed only where a reply token is: a
    batch's replies are padded to its longest, and logits for the padding, with a second
    log-softmax for the entropy, made the update 12-15% slower on the world's word problems."""
    hidden = reply_hidden(model, batch, mb) if hidden is None else hidden
    targets = batch.targets if mb is None else batch.targets[mb]
    real = Kept.of(targets != IGNORE_INDEX)
    logits = model.lm_head(real.gather(hidden)).float()  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    picked = real.pad(logp.gather(1, real.gather(targets)[:, None])[:, 0])  # (b, Tr)
    if not with_entropy:
        return picked, None
    with torch.no_grad():
        entropy = real.pad(-(logp.exp() * logp).sum(-1))
    return picked, entropy


def update_passes(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    n_rows: int,
    iterations: int,
    minibatches: int,
    grad_clip: float,
    step_loss: Callable[[list[int], int], tuple[torch.Tensor, dict[str, float], float]],
    d: Dist | None = None,
    offset: int = 0,
    total: int | None = None,
) -> dict[str, float]:
    """`iterations` passes over the rollout batch, each in `minibatches` optimiser steps
    with gradient clipping. `step_loss(rows, k)` returns the k-th step's loss on those rows
    (a mean), its figures, and the weight the mean is over (its tokens or rows). Returns
    each figure averaged over the steps.

    Under torchrun the batch's `total` rows are spread over the ranks, this one holding
    rows offset .. offset + n_rows - 1 (its `rows` count from its first). A minibatch is
    the same rows of the whole batch as in one process; each rank's loss counts by its
    share of the minibatch's weight and the gradients are summed over the ranks, so every
    step is the one process's. A rank with none of a minibatch's rows gets `rows` empty:
    `step_loss` must then return a loss of weight 0 that reaches every parameter, so that
    each rank's gradients have the same shape. The figures are combined over the ranks by
    the same shares (for a loss over replies, a per-token figure is then a little off the
    one process's)."""
    d = d or Dist()
    total = n_rows if total is None else total
    size = math.ceil(total / minibatches)
    sums: dict[str, float] = {}
    k = 0
    for _ in range(iterations):
        for start in range(0, total, size):
            first, end = max(start, offset), min(start + size, offset + n_rows)
            loss, figures, weight = step_loss(list(range(first - offset, end - offset)), k)
            share = weight / all_reduce_sum(weight, d)
            (loss * share).backward()
            sum_gradients_over_ranks(params, d)
            torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            figures = weighted_mean_over_ranks({"loss": loss.item(), **figures}, share, d)
            for name, value in figures.items():
                sums[name] = sums.get(name, 0.0) + value
            k += 1
    return {name: round(value / k, 5) for name, value in sums.items()}


def checkpoint_step(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    section: OnlineRL,
    state: dict[str, Any],
    d: Dist | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """After every `section.checkpoint_every`-th step and the last (by count, or because
    state["elapsed_seconds"] has passed `section.time_limit`: under torchrun, on any rank's
    clock, as `rl_steps` stops), a checkpoint holding `state` (for `start_log(resume=True)`)
    and `extra`'s tensor sets, written by the main process."""
    d = d or Dist()
    out_of_time = False
    if section.time_limit:
        late = state["elapsed_seconds"] > section.time_limit
        out_of_time = all_reduce_sum(float(late), d) > 0
    due = step % section.checkpoint_every == 0 or step == section.steps or out_of_time
    if d.is_main and due:
        save_checkpoint(
            out / "checkpoints", step, model, optimizer, state, section.keep_last, extra
        )


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (Linux's flags: x86's AVX512-BF16 or AMX,
    Arm's BF16); None where it cannot tell."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@contextlib.contextmanager
def training_matmuls(section: OnlineRL, d: Dist, *models: Transformer | None):
    """The models' linear layers multiply in `section.matmul_dtype` within this block (the
    training loop: sampling, rewards the policy judges itself, updates; the held-out
    evaluations before and after, and PPO's probes, stay float32, so that they measure the
    weights alone)."""
    dtype = autocast_dtype(section.matmul_dtype, d.device)
    if dtype is not None and d.device.type == "cpu" and cpu_has_bf16() is False and d.is_main:
        console.print(
            "note: matmul_dtype=bfloat16 on a CPU without bf16 instructions (AVX512-BF16, "
            "AMX): the products are emulated, likely slower than float32"
        )
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(model.matmuls_in(dtype))
        yield


def rl_steps(
    section: OnlineRL,
    optimizer: torch.optim.Optimizer,
    done: int = 0,
    elapsed: float = 0.0,
    d: Dist | None = None,
) -> Iterator[tuple[int, float]]:
    """Steps done+1 .. section.steps (fewer when `section.time_limit` seconds of training,
    `elapsed` of them before a resume, run out: under torchrun, on any rank's clock, so
    that all stop together), each with its learning rate (warmup, then cosine to
    min_lr_ratio) set on the optimiser."""
    start = time.perf_counter() - elapsed
    for step in range(done + 1, section.steps + 1):
        if section.time_limit:
            late = time.perf_counter() - start > section.time_limit
            if all_reduce_sum(float(late), d or Dist()) > 0:
                return
        lr = lr_at(step - 1, section.steps, section.lr, section.warmup_steps, section.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        yield step, lr
