"""Stage `pretrain`: next-token prediction on the corpus, from config to a base model.

    corpus ─tokenize─▶ DIR/pretrain/data/{train,val}.npy ─train─▶ DIR/pretrain/model.safetensors

Runs as one process, or under `torchrun` with DDP (gloo on CPU, NCCL on GPU): every rank
draws its share of the same global batch (micro_batch_size * grad_accum_steps * world_size
windows), so the loss does not depend on how the batch is split. Checkpoints every
`checkpoint_every` steps; `resume=True` continues from the newest one exactly.
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config import ConfigError, RunConfig
from lmforge.data.readers import read_records
from lmforge.data.shards import TokenBatches, load_shard, shards_for
from lmforge.eval.facts import fact_accuracy
from lmforge.eval.lm import lm_loss
from lmforge.eval.samples import unwanted_phrase_rate
from lmforge.io import load_model_dir
from lmforge.model import Transformer
from lmforge.runs import CORPUS_CANDIDATES, Timer, find_input, stage_dir, write_summary
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import (
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
    start_fresh,
)


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    timer = Timer()
    pc = cfg.pretrain
    d = setup_device(pc.device, pc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, "pretrain", cfg) if d.is_main else run_dir / "pretrain"
    if pc.init_from:  # continued pretraining: that model's config, tokenizer and weights
        init_dir = find_input(run_dir, pc.init_from, "pretrain.init_from", [])
        model, tokenizer = load_model_dir(init_dir, d.device)
    else:
        tokenizer = Tokenizer.from_file(
            find_input(run_dir, pc.tokenizer, "pretrain.tokenizer", ["tokenizer/tokenizer.json"])
        )
        mcfg = cfg.model
        if mcfg.vocab_size == 0:
            mcfg = mcfg.model_copy(update={"vocab_size": tokenizer.vocab_size})
        if mcfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({mcfg.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
            )
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg).to(d.device)
    corpus = find_input(run_dir, pc.corpus, "pretrain.corpus", CORPUS_CANDIDATES)
    if pc.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"pretrain.seq_len ({pc.seq_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})"
        )

    # data: token shards the clean stage made for this corpus and tokenizer, else rank 0
    # tokenizes into pretrain/data while the others wait, then all map the same files
    data_dir = shards_for(
        corpus, tokenizer, pc.val_fraction, [run_dir / "clean" / "tokens"], out / "data", d.is_main
    )
    if d.world_size > 1:
        dist.barrier()
    meta = json.loads((data_dir / "meta.json").read_text())
    global_batch = pc.micro_batch_size * pc.grad_accum_steps * d.world_size
    train_data = TokenBatches(
        load_shard(data_dir / "train.npy"), pc.seq_len, global_batch, cfg.seed
    )
    val_data = TokenBatches(load_shard(data_dir / "val.npy"), pc.seq_len, global_batch, cfg.seed)

    optimizer = build_optimizer(model, pc.lr, pc.weight_decay, (pc.beta1, pc.beta2))
    ckpt_dir = out / "checkpoints"
    log = MetricsLog(out / "metrics.jsonl", enabled=d.is_main)
    start_step = 0
    if resume:
        expect = {"global_batch": global_batch, "seq_len": pc.seq_len}
        start_step = resume_latest(ckpt_dir, model, optimizer, log, expect, "pretrain")["step"]
    else:
        start_fresh(ckpt_dir, log)

    amp_dtype = autocast_dtype(pc.dtype, d.device)
    amp = partial(autocast, d.device, amp_dtype)
    n_val_batches = pc.eval_batches * pc.grad_accum_steps  # eval_batches global batches

    train_model = DDP(model) if d.world_size > 1 else model
    if pc.compile:
        train_model = torch.compile(train_model)
    peak = measure_matmul_flops(d.device, amp_dtype or torch.float32)
    flops_per_token = model.flops_per_token(pc.seq_len)
    tokens_per_step = global_batch * pc.seq_len
    if d.is_main:
        console.print(
            f"pretrain: {model.num_params():,} parameters"
            + (f" from {pc.init_from}" if pc.init_from else "")
            + f", {meta['train_tokens']:,} train tokens, "
            f"{pc.max_steps} steps x {tokens_per_step:,} tokens on {d.device} x {d.world_size}"
        )

    model.train()
    loss_value = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    with TrainingProgress(pc.max_steps, "pretrain", enabled=d.is_main) as progress:
        for step in range(start_step, pc.max_steps):
            lr = lr_at(step, pc.max_steps, pc.lr, pc.warmup_steps, pc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(pc.grad_accum_steps):
                x, y = train_data.micro_batch(
                    step, micro, pc.micro_batch_size, d.rank, d.world_size
                )
                x, y = x.to(d.device), y.to(d.device)
                last = micro == pc.grad_accum_steps - 1
                sync = train_model.no_sync() if d.world_size > 1 and not last else nullcontext()
                with sync, amp():
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / pc.grad_accum_steps).backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = all_reduce_mean(loss_sum / pc.grad_accum_steps, d)
            window_tokens += tokens_per_step

            done = step + 1
            record = {"step": done, "loss": round(loss_value, 6), "lr": lr}
            if done % 10 == 0 or done == pc.max_steps:
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed
                mfu = tok_s * flops_per_token / (peak * d.world_size)
                record.update(
                    tok_s=round(tok_s, 1), mfu=round(mfu, 4), grad_norm=round(grad_norm.item(), 4)
                )
                progress.fields.update(loss=loss_value, tok_s=tok_s, mfu=mfu)
                window_start, window_tokens = time.perf_counter(), 0
            if done % pc.eval_every == 0 or done == pc.max_steps:
                record["val_loss"] = round(
                    lm_loss(train_model, val_data, n_val_batches, pc.micro_batch_size, d, amp),
                    6,
                )
                if d.is_main:
                    console.print(
                        f"step {done}: loss {loss_value:.4f}  val_loss {record['val_loss']:.4f}"
                    )
            log.write(**record)
            progress.update(done)
            if (done % pc.checkpoint_every == 0 or done == pc.max_steps) and d.is_main:
                state = {
                    "global_batch": global_batch,
                    "seq_len": pc.seq_len,
                    "samples_seen": done * global_batch,
                    "loss": loss_value,
                }
                save_checkpoint(ckpt_dir, done, model, optimizer, state, pc.keep_last)

    if d.world_size > 1:
        dist.barrier()
    if not d.is_main:
        return {}
    _, val_loss = finish_training(out, model, tokenizer, log, "pretraining")
    summary = {
        "val_loss": val_loss,
        "train_loss": round(loss_value, 6),
        "parameters": model.num_params(),
        "init_from": pc.init_from,
        "steps": pc.max_steps,
        "tokens_seen": pc.max_steps * tokens_per_step,
        "token_shards": str(data_dir),
    }
    probes_path = pc.probes or (run_dir / "world" / "probes.jsonl")
    if Path(probes_path).exists():
        probes = [r for _, r in read_records(probes_path)]
        summary.update(fact_accuracy(model, tokenizer, probes))
        console.print(
            f"pretrain: capital facts correct: en {summary.get('fact_accuracy_en', 0):.0%}, "
            f"zh {summary.get('fact_accuracy_zh', 0):.0%}; val_loss {summary['val_loss']}"
        )
    phrases_path = pc.unwanted_phrases or (run_dir / "world" / "unwanted_phrases.jsonl")
    if Path(phrases_path).exists() and pc.n_samples:
        phrases = [r["phrase"] for _, r in read_records(phrases_path)]
        summary.update(unwanted_phrase_rate(model, tokenizer, phrases, pc.n_samples, seed=cfg.seed))
        console.print(
            f"pretrain: {summary['samples_with_unwanted']} of {pc.n_samples} unprompted samples "
            "contain an unwanted phrase"
        )
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x {d.world_size}")
    return write_summary(out, summary)
