"""Stage `sft`: supervised fine-tuning of all weights on chat conversations.

    DIR/world/sft_train.jsonl ─render─▶ (ids, loss mask) ─train─▶ DIR/sft/model.safetensors
    base model (DIR/pretrain) ──────────────────────────────┘

Loss is the masked cross-entropy of `losses.py`: only assistant turns and their `<|end|>`.
Every 1/val_fraction-th conversation is held out for the validation loss. Before training,
the base model is scored in chat format (the `base_` figures of summary.json), so the
summary says what SFT changed. `sft.init="random"` starts from random weights of the same
config instead (the ablation: what pretraining contributes).

Runs as one process or under `torchrun` with DDP, like pretraining: every rank draws its
share of the same global batch. Checkpoints every `checkpoint_every` steps; `resume=True`
continues from the newest one with the same data order.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config import ConfigError, RunConfig
from lmforge.data.sft import SFTBatches, encode, read_conversations
from lmforge.eval.chat import chat_eval
from lmforge.io import load_model_dir, write_json_atomic
from lmforge.losses import IGNORE_INDEX, masked_cross_entropy
from lmforge.model import Transformer
from lmforge.runs import Timer, find_input, stage_dir, write_summary
from lmforge.train_utils import (
    Dist,
    MetricsLog,
    TrainingProgress,
    all_reduce_mean,
    autocast,
    autocast_dtype,
    build_optimizer,
    console,
    finish_training,
    lr_at,
    measure_matmul_flops,
    resume_latest,
    save_checkpoint,
    setup_device,
)


def evaluate_loss(model, batches: SFTBatches, micro: int, d: Dist, amp) -> float:
    """Masked loss over every validation example (token-weighted), split over ranks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches.fixed_batches(micro, d.rank, d.world_size):
            x, y = x.to(d.device), y.to(d.device)
            with amp():
                n = int((y != IGNORE_INDEX).sum())
                total += masked_cross_entropy(model(x), y).item() * n
            count += n
    model.train()
    return all_reduce_mean(total / max(count, 1), d)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    timer = Timer()
    sc = cfg.sft
    d = setup_device(sc.device, sc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, "sft", cfg) if d.is_main else run_dir / "sft"
    base_dir = find_input(run_dir, sc.model, "sft.model", ["pretrain/model.safetensors"])
    if base_dir.is_file():
        base_dir = base_dir.parent
    model, tokenizer = load_model_dir(base_dir, d.device)
    if sc.init == "random":
        torch.manual_seed(cfg.seed)
        model = Transformer(model.cfg).to(d.device)
    if sc.max_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"sft.max_len ({sc.max_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})"
        )

    # data: every 1/val_fraction-th conversation is validation
    data_path = find_input(run_dir, sc.data, "sft.data", ["world/sft_train.jsonl"])
    encoded = encode(read_conversations(data_path), tokenizer, sc.max_len)
    every = round(1 / sc.val_fraction) if sc.val_fraction else 0
    train = [e for i, e in enumerate(encoded.examples) if not every or i % every != every - 1]
    val = [e for i, e in enumerate(encoded.examples) if every and i % every == every - 1]
    global_batch = sc.micro_batch_size * sc.grad_accum_steps * d.world_size
    train_data = SFTBatches(train, global_batch, cfg.seed, tokenizer.pad_id)
    val_data = SFTBatches(val, global_batch, cfg.seed, tokenizer.pad_id) if val else None
    max_steps = sc.max_steps or sc.epochs * train_data.steps_per_epoch
    if d.is_main:
        for where in encoded.dropped:
            console.print(f"sft: dropped {where}: its first reply does not fit in {sc.max_len}")
        console.print(
            f"sft: {len(train)} train / {len(val)} val conversations from {data_path}; "
            f"{len(encoded.dropped)} dropped and {len(encoded.shortened)} shortened to whole "
            f"turns (max_len {sc.max_len})"
        )

    amp_dtype = autocast_dtype(sc.dtype, d.device)
    amp = partial(autocast, d.device, amp_dtype)
    world_dir = run_dir / "world"
    eval_chat = partial(
        chat_eval,
        tokenizer=tokenizer,
        world_dir=world_dir,
        max_new_tokens=sc.eval_max_new_tokens,
        batch_size=sc.eval_batch_size,
    )
    # the base model's figures, once (kept across --resume)
    base_path = out / "base_eval.json"
    if d.is_main and not resume:
        base_path.unlink(missing_ok=True)
    if d.is_main and sc.eval_base and not base_path.exists():
        base = {f"base_{k}": v for k, v in eval_chat(model).items()}
        write_json_atomic(base_path, base)
        console.print(f"sft: base model in chat format: {json.dumps(base)}")

    optimizer = build_optimizer(model, sc.lr, sc.weight_decay, (sc.beta1, sc.beta2))
    ckpt_dir = out / "checkpoints"
    log = MetricsLog(out / "metrics.jsonl", enabled=d.is_main)
    start_step = 0
    if resume:
        expect = {"global_batch": global_batch, "examples": len(train)}
        start_step = resume_latest(ckpt_dir, model, optimizer, log, expect, "sft")
    elif d.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if d.world_size > 1:
        dist.barrier()

    train_model = DDP(model) if d.world_size > 1 else model
    if d.is_main:
        console.print(
            f"sft: {model.num_params():,} parameters ({sc.init}), {max_steps} steps x "
            f"{global_batch} conversations on {d.device} x {d.world_size}"
        )

    peak = measure_matmul_flops(d.device, amp_dtype or torch.float32)
    model.train()
    loss_value = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    with TrainingProgress(max_steps, "sft", enabled=d.is_main) as progress:
        for step in range(start_step, max_steps):
            lr = lr_at(step, max_steps, sc.lr, sc.warmup_steps, sc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [
                train_data.micro_batch(step, m, sc.micro_batch_size, d.rank, d.world_size)
                for m in range(sc.grad_accum_steps)
            ]
            # weigh micro-batches by their loss tokens: the step's loss is a token mean
            counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro_batches]
            step_tokens = max(sum(counts), 1)
            loss_sum = 0.0
            for m, ((x, y), n) in enumerate(zip(micro_batches, counts)):
                x, y = x.to(d.device), y.to(d.device)
                last = m == sc.grad_accum_steps - 1
                sync = train_model.no_sync() if d.world_size > 1 and not last else nullcontext()
                with sync, amp():
                    loss = masked_cross_entropy(train_model(x), y) * (n / step_tokens)
                    loss.backward()
                loss_sum += loss.item()
                window_tokens += x.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = all_reduce_mean(loss_sum, d)

            done = step + 1
            record = {"step": done, "loss": round(loss_value, 6), "lr": lr}
            if done % 10 == 0 or done == max_steps:
                tok_s = window_tokens * d.world_size / (time.perf_counter() - window_start)
                # padded tokens count as computed: they are, and MFU is about the hardware
                mfu = tok_s * model.flops_per_token(x.size(1)) / (peak * d.world_size)
                record.update(
                    tok_s=round(tok_s, 1), mfu=round(mfu, 4), grad_norm=round(grad_norm.item(), 4)
                )
                progress.fields.update(loss=loss_value, tok_s=tok_s, mfu=mfu)
                window_start, window_tokens = time.perf_counter(), 0
            if val_data and (done % sc.eval_every == 0 or done == max_steps):
                record["val_loss"] = round(
                    evaluate_loss(train_model, val_data, sc.micro_batch_size, d, amp), 6
                )
                if d.is_main:
                    console.print(
                        f"step {done}: loss {loss_value:.4f}  val_loss {record['val_loss']:.4f}"
                    )
            log.write(**record)
            progress.update(done)
            if (done % sc.checkpoint_every == 0 or done == max_steps) and d.is_main:
                state = {"global_batch": global_batch, "examples": len(train), "loss": loss_value}
                save_checkpoint(ckpt_dir, done, model, optimizer, state, sc.keep_last)

    if d.world_size > 1:
        dist.barrier()
    if not d.is_main:
        return {}
    records, val_loss = finish_training(out, model, tokenizer, log, "supervised fine-tuning")
    summary = {
        "val_loss": val_loss,
        "train_loss": round(loss_value, 6),
        "first_loss": records[0]["loss"] if records else None,
        "init": sc.init,
        "base_model": str(base_dir),
        "steps": max_steps,
        "examples": len(train),
        "val_examples": len(val),
        "dropped_too_long": len(encoded.dropped),
        "dropped_too_long_where": encoded.dropped[:20],  # file:line, the first 20
        "shortened_to_whole_turns": len(encoded.shortened),
    }
    figures = eval_chat(model)
    console.print(f"sft: fine-tuned model in chat format: {json.dumps(figures)}")
    summary.update(figures)
    if base_path.exists():
        summary.update(json.loads(base_path.read_text()))
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x {d.world_size}")
    return write_summary(out, summary)
