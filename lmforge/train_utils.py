"""What every training recipe shares: device and distributed set-up, the optimizer and its
schedule, checkpoints, metrics, progress and plots. Recipes own their loops; these are parts.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmforge.config import ConfigError
from lmforge.io import (
    CheckpointError,
    load_model_state,
    load_tensors,
    model_state,
    save_model_dir,
    save_tensors_atomic,
    sha256_file,
    write_json_atomic,
)

# no emoji codes: a data location such as "sft.jsonl:100: ..." would print as "sft.jsonl💯 ..."
console = Console(stderr=True, emoji=False)


# ---- device and distributed ---------------------------------------------------------------
@dataclass
class Dist:
    """Where this process runs: rank r of world_size on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """How many processes torchrun started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process_only(what: str) -> None:
    """Refuse to run `what`, which has no data-parallel version, under torchrun (before the
    process group is joined)."""
    if world_size() > 1:
        raise ConfigError(
            f"{what} runs in one process ({world_size()} were started by torchrun): "
            "run it without torchrun"
        )


def setup_device(device: str = "auto", num_threads: int = 0) -> Dist:
    """Pick the device and, under torchrun (RANK/WORLD_SIZE set), join the process group:
    NCCL on GPUs, gloo on CPUs."""
    if num_threads:
        torch.set_num_threads(num_threads)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device")
    processes = world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if processes > 1 and not dist.is_initialized():
        # long enough for the ranks that wait while rank 0 alone makes the world, cleans the
        # corpus and trains the tokenizer (`pipeline.run_pipeline`)
        timeout = datetime.timedelta(hours=2)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return Dist(rank, processes, local_rank, dev)


def wait_for_all_ranks(d: Dist) -> None:
    """Under torchrun, return when every rank has come here."""
    if d.world_size > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Under torchrun, wait for every rank to finish (rank 0 measures and saves after the
    others are done), then leave the process group. A rank that exited with gloo's threads
    still running was aborted now and then ("terminate called without an active exception",
    SIGABRT), and torchrun failed the whole run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA by default, none (fp32) on CPU."""
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def all_reduce_sums(values: Sequence[float], d: Dist) -> list[float]:
    """Each value's sum over all ranks, in one collective (themselves in a single process)."""
    if d.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum(value: float, d: Dist) -> float:
    """The sum of `value` over all ranks (itself in a single process)."""
    return all_reduce_sums([value], d)[0]


def gather_ints(values: Sequence[int], d: Dist) -> list[list[int]]:
    """Every rank's `values` (the same number on each), in rank order."""
    if d.world_size == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.long, device=d.device)
    every = [torch.empty_like(mine) for _ in range(d.world_size)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def all_reduce_mean(value: float, d: Dist) -> float:
    return all_reduce_sum(value, d) / d.world_size


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of this device, measured on square matmuls (the MFU denominator)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# ---- optimizer and schedule -----------------------------------------------------------------
def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW that decays matrices only: norms, biases and embeddings are not decayed
    (shrinking them towards zero only hurts)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed_tokens" in name or "lm_head" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into n items: every epoch a fresh permutation, and a
    batch that crosses an epoch's end is filled from the next one."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += rng.sample(range(n), n)
        yield order[:batch_size]
        order = order[batch_size:]


def planned_steps(section: Any, n_items: int) -> int:
    """`section.max_steps`, else `section.epochs` passes over n_items in batches."""
    return section.max_steps or section.epochs * math.ceil(n_items / section.batch_size)


def start_log(
    out: Path,
    n_items: int,
    per_step: int,
    seed: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    expect: dict[str, Any],
    resume: bool,
    stage: str,
    main: bool = True,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[MetricsLog, Iterator[list[int]], dict[str, Any]]:
    """metrics.jsonl in `out`, endless shuffled batches of item indices, and the training
    state to start from. With `resume`, the newest checkpoint in out/checkpoints is restored
    into model and optimizer (`expect`: what it must have been written with), the log is cut
    at its step and the batches are advanced past it: a step's items (and an RL step's
    samples) are functions of (seed, step), so the resumed steps draw what the uninterrupted
    run drew; `extra`'s tensor sets are restored too (see `load_checkpoint`). Without it, an
    earlier run's metrics go and its checkpoints are set aside (`start_fresh`). Only the
    `main` process writes (under torchrun, rank 0)."""
    log = MetricsLog(out / "metrics.jsonl", enabled=main)
    state: dict[str, Any] = {"step": 0}
    if resume:
        state = resume_latest(out / "checkpoints", model, optimizer, log, expect, stage, extra)
    else:
        start_fresh(out / "checkpoints", log)
    batches = shuffled_batches(n_items, per_step, seed)
    for _ in range(state["step"]):
        next(batches)
    return log, batches, state


def train_on_batches(
    model: torch.nn.Module,
    section: Any,
    n_items: int,
    seed: int,
    name: str,
    out: Path,
    step: Callable[[list[int]], tuple[torch.Tensor, dict[str, Any], int, float]],
    d: Dist,
    resume: bool = False,
    expect: dict[str, Any] | None = None,
) -> float:
    """The loop the preference stages share: AdamW (`build_optimizer`) with warmup and cosine
    decay, `section.batch_size` item indices a step (`shuffled_batches`), gradient clipping,
    out/metrics.jsonl and a progress bar. `step(indices)` returns the loss to minimise (a
    weighted mean over the items), metrics to log beside it, how many tokens it computed and
    the items' total weight. Returns the last loss. `section` has the optimiser and
    checkpoint fields of `config.PolicyTraining`.

    Under torchrun every rank takes every world_size-th index of the step's batch; its loss
    counts by its share of the batch's weight and the gradients are summed over ranks, so
    the step is the one a single process takes on the whole batch for a loss that is a
    weighted mean over items (DPO, the reward model without centring). What a rank estimates
    from its own items (KTO's reference point, the reward model's centring term) and the
    logged metrics, means of the ranks' means weighted by their shares, can differ a little.

    Every `section.checkpoint_every` steps and after the last, out/checkpoints/ gets the
    model, optimiser and RNG; `resume` continues from the newest (`start_log`), refusing one
    written with other `expect` values or another batch size, which would draw other items."""
    if section.batch_size < d.world_size:
        raise ConfigError(
            f"{name}.batch_size {section.batch_size} leaves some of the {d.world_size} "
            "processes without an item: set it to at least the number of processes"
        )
    max_steps = planned_steps(section, n_items)
    optimizer = build_optimizer(
        model, section.lr, section.weight_decay, (section.beta1, section.beta2)
    )
    expect = {**(expect or {}), "batch_size": section.batch_size, "items": n_items}
    log, batches, state = start_log(
        out, n_items, section.batch_size, seed, model, optimizer, expect, resume, name, d.is_main
    )
    params = [p for p in model.parameters() if p.requires_grad]
    start, tokens, loss_value = time.perf_counter(), 0, state.get("loss", float("nan"))
    model.train()
    with TrainingProgress(max_steps, name, enabled=d.is_main) as progress:
        if state["step"]:
            progress.update(state["step"])
        for done in range(state["step"] + 1, max_steps + 1):
            lr = lr_at(done - 1, max_steps, section.lr, section.warmup_steps, section.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, metrics, n_tokens, weight = step(next(batches)[d.rank :: d.world_size])
            share = weight / all_reduce_sum(weight, d)
            (loss * share).backward()
            sum_gradients_over_ranks(params, d)
            torch.nn.utils.clip_grad_norm_(params, section.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = all_reduce_sum(loss.item() * share, d)
            metrics = weighted_mean_over_ranks(metrics, share, d)
            tokens += all_reduce_sum(n_tokens, d)
            log.write(step=done, loss=round(loss_value, 6), **metrics, lr=lr)
            progress.update(done, loss=loss_value, tok_s=tokens / (time.perf_counter() - start))
            if (done % section.checkpoint_every == 0 or done == max_steps) and d.is_main:
                checkpoint = dict(expect, loss=loss_value)
                save_checkpoint(
                    out / "checkpoints", done, model, optimizer, checkpoint, section.keep_last
                )
    return loss_value


def sum_gradients_over_ranks(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Replace each gradient by its sum over the ranks, in one collective of all of them
    flattened (one per parameter would cost a round trip each, every step); a parameter the
    loss does not reach has no gradient on any rank and is left out."""
    if d.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def weighted_mean_over_ranks(
    metrics: dict[str, float | None], share: float, d: Dist
) -> dict[str, float | None]:
    """Each metric's mean over the ranks, weighted by `share` (rounded to 4 places); a rank
    whose items had no value for it (None) is left out, and None stays None everywhere."""
    if d.world_size == 1:
        return metrics
    keys = sorted(metrics)  # every rank runs the same step function: the same keys
    sums = torch.tensor(
        [[metrics[k] * share, share] if metrics[k] is not None else [0.0, 0.0] for k in keys],
        dtype=torch.float64,
        device=d.device,
    )
    dist.all_reduce(sums)
    return {k: round(v / w, 4) if w > 0 else None for k, (v, w) in zip(keys, sums.tolist())}


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to lr * min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


# ---- checkpoints ---------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{key}": (v if torch.is_tensor(v) else torch.tensor(v))
        for idx, state in sd["state"].items()
        for key, v in state.items()
    }
    return tensors, sd["param_groups"]


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ckpt_dir/step_XXXXXXXX/ with model.safetensors, optimizer.safetensors, rng.safetensors,
    NAME.safetensors for each of `extra`'s tensor sets (a weight average, say) and state.json
    (step, data position, param groups, sha256 of each file). The directory is built under a
    temp name and renamed, so a kill mid-write never leaves a half checkpoint; then all but
    the newest keep_last are removed."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, groups = _optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    files = {
        "model.safetensors": model_state(model),
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": rng,
        **{f"{name}.safetensors": tensors for name, tensors in (extra or {}).items()},
    }
    for name, tensors in files.items():
        save_tensors_atomic(tensors, tmp / name)
    record = dict(state, step=step, param_groups=groups)
    record["sha256"] = {name: sha256_file(tmp / name) for name in files}
    write_json_atomic(tmp / "state.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of killed writes are ignored)."""
    if not ckpt_dir.exists():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint directory's state.json, checked to be one (step, sha256, param_groups)."""
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path}: truncated or corrupted ({e})") from None
    if not isinstance(state, dict) or not {"step", "sha256", "param_groups"} <= state.keys():
        raise CheckpointError(
            f"{state_path}: not a checkpoint state (needs step, sha256, param_groups)"
        )
    return state


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a checkpoint directory, and copy the tensor
    sets `save_checkpoint` was given as `extra` into the same-named ones of `extra`; returns
    its state.json. Every file is checked against its recorded sha256 before anything is
    loaded."""
    state = checkpoint_state(path)
    for name, digest in state["sha256"].items():
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: file is missing")
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path / name}: corrupted (sha256 does not match state.json)")
    load_model_state(model, load_tensors(path / "model.safetensors"), path / "model.safetensors")
    if optimizer is not None:
        flat = load_tensors(path / "optimizer.safetensors")
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in flat.items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = v
        try:
            optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: does not fit ({e})") from None
    for name, tensors in (extra or {}).items():
        file = path / f"{name}.safetensors"
        saved = load_tensors(file)
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        if {key: tuple(t.shape) for key, t in saved.items()} != shapes:
            raise CheckpointError(f"{file}: holds other tensors than this run keeps")
        for key, tensor in tensors.items():
            tensor.copy_(saved[key])
    rng = load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return state


def start_fresh(ckpt_dir: Path, log: MetricsLog) -> None:
    """Forget an earlier run of the stage: its metrics go, and its checkpoints, which a
    later --resume would take for this run's own, move to checkpoints.previous (replacing
    the set kept there before), so that a run started without --resume by mistake loses
    nothing yet."""
    if not log.enabled:
        return
    log.path.unlink(missing_ok=True)
    if list_checkpoints(ckpt_dir):
        previous = ckpt_dir.with_name(ckpt_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(ckpt_dir, previous)
        console.print(f"starting fresh: the earlier run's checkpoints are now in {previous}")
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def resume_latest(
    ckpt_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    log: MetricsLog,
    expect: dict[str, Any],
    stage: str,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Restore the newest checkpoint of `ckpt_dir` and return its state, whose "step" is the
    step to continue from ({"step": 0} when there is none). `expect` holds the state values
    the checkpoint must have been written with, such as the global batch: with others, the
    same step would draw other data."""
    checkpoints = list_checkpoints(ckpt_dir)
    if not checkpoints:
        if log.enabled:
            console.print(f"{stage}: --resume found no checkpoint in {ckpt_dir}; starting fresh")
        start_fresh(ckpt_dir, log)
        return {"step": 0}
    state = checkpoint_state(checkpoints[-1])
    differ = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
    if differ:
        was = ", ".join(f"{k} {old}" for k, (old, _) in differ.items())
        now = ", ".join(f"{k} {new}" for k, (_, new) in differ.items())
        raise ConfigError(f"{checkpoints[-1]}: written with {was}; this run has {now}")
    load_checkpoint(checkpoints[-1], model, optimizer, extra)
    if log.enabled:
        console.print(f"{stage}: resuming from {checkpoints[-1]} (step {state['step']})")
    log.keep_until(state["step"])
    return state


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging): after each
    step, average <- decay * average + (1 - decay) * weights, starting from the weights it
    was made with, so that the newest weights count most and the mean age of those averaged
    is decay / (1 - decay) steps (99 at 0.99).
    RL's iterates are noisy: on `configs/arithmetic.toml`, the greedy accuracy of GRPO
    checkpoints 100 steps apart went 0.375, 0.345, 0.40, while the average of the three
    scored 0.4075. Kept in float32 beside the model; `tensors` is what a checkpoint holds."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())  # a tied weight once
        self.tensors = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Take in the model's weights, after an optimiser step."""
        for name, p in self.params.items():
            self.tensors[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Give the model the averaged weights."""
        for name, p in self.params.items():
            p.copy_(self.tensors[name])


# ---- metrics, progress, plots -----------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (a resumed run trains those steps again)."""
        if self.enabled:
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class TrainingProgress:
    """A rich progress bar with loss, tokens/s, MFU and ETA; where stderr is not a terminal
    (CI logs, background runs) it prints one plain line every 5% instead."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self.fields = {"loss": float("nan"), "tok_s": 0.0, "mfu": 0.0}
        self.plain = enabled and not console.is_terminal
        self.every = max(1, total // 20)
        self.start = time.perf_counter()
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
            TextColumn("MFU {task.fields[mfu]:.1%}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or self.plain,
        )
        self.task = self.bar.add_task(description, total=total, **self.fields)

    def __enter__(self) -> TrainingProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def update(self, completed: int, **fields: float) -> None:
        self.fields.update(fields)
        self.bar.update(self.task, completed=completed, **fields)
        if self.plain and (completed % self.every == 0 or completed == self.total):
            elapsed = time.perf_counter() - self.start
            f = self.fields
            mfu = f"  MFU {f['mfu']:.1%}" if f["mfu"] else ""  # stages that measure it
            console.print(
                f"{self.description} {completed}/{self.total}  loss {f['loss']:.4f}  "
                f"{f['tok_s']:,.0f} tok/s{mfu}  elapsed {elapsed:.0f}s",
                highlight=False,
            )


def finish_training(
    out: Path, model: torch.nn.Module, tokenizer, log: MetricsLog, title: str
) -> tuple[list[dict], float | None]:
    """Write the trained model directory and its loss curve; returns the metric records
    and the last validation loss."""
    save_model_dir(out, model, tokenizer)
    records = log.read()
    plot_curves(records, out / "loss.png", title)
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    return records, (val_losses[-1] if val_losses else None)


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
