"""Stage `sft`: supervised fine-tuning on chat conversations, of all weights or of LoRA adapters.

    DIR/world/sft_train.jsonl ─render─▶ (ids, loss mask) ─train─▶ DIR/sft/model.safetensors
    base model (DIR/pretrain) ──────────────────────────────┘      DIR/sft/adapter/ (LoRA)

Loss is the masked cross-entropy of `losses.py`: only assistant turns and their `<|end|>`.
Every 1/val_fraction-th conversation is held out for the validation loss. Before training,
the base model is scored in chat format (the `base_` figures of summary.json), so the
summary says what SFT changed. `sft.init="random"` starts from random weights of the same
config instead (the ablation: what pretraining contributes).

`sft.method="lora"` freezes the base weights and trains adapters only (`model/lora.py`); the
adapters are saved on their own (`adapter/`, exportable to PEFT) and merged into the weights
of the model directory, so every later stage sees a plain model.

Forgetting: fine-tuning on a narrow set of conversations can erase what pretraining taught.
`lm_loss_before` / `lm_loss_after` measure it, as the language-modelling loss on the held-out
pretraining text (the corpus's validation split); `sft.replay_fraction` counters it by making
that share of every batch's rows windows of pretraining text, every token of which carries
loss (InstructGPT's "pretraining mix").

Runs as one process or under `torchrun` with DDP, like pretraining: every rank draws its
share of the same global batch. Checkpoints every `checkpoint_every` steps; `resume=True`
continues from the newest one with the same data order.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config import ConfigError, RunConfig
from lmforge.data.sft import SFTBatches, encode, pack, read_conversations, segment_attention
from lmforge.data.shards import TokenBatches, load_shard, shards_for
from lmforge.eval.chat import chat_eval
from lmforge.eval.lm import lm_loss
from lmforge.io import load_model_dir, write_json_atomic
from lmforge.losses import IGNORE_INDEX, masked_cross_entropy
from lmforge.model import Transformer
from lmforge.model.lora import (
    apply_lora,
    count_trainable,
    merge_lora,
    save_adapter,
    train_token_rows,
)
from lmforge.runs import (
    CORPUS_CANDIDATES,
    Timer,
    find_input,
    find_model_dir,
    stage_dir,
    write_summary,
)
from lmforge.tokenizer import Tokenizer
from lmforge.train_utils import (
    Dist,
    MetricsLog,
    TrainingProgress,
    all_reduce_mean,
    all_reduce_sum,
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

LM_EVAL_WINDOWS = 512  # held-out pretraining windows scored before and after (bounds its cost)


def evaluate_loss(model, batches: SFTBatches, micro: int, d: Dist, amp) -> float:
    """Masked loss over every validation example, split over ranks: the mean over all loss
    tokens, whatever the split."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, segments in batches.fixed_batches(micro, d.rank, d.world_size):
            x, y = x.to(d.device), y.to(d.device)
            with amp():
                n = int((y != IGNORE_INDEX).sum())
                total += _loss(model, x, y, segments).item() * n
            count += n
    model.train()
    return all_reduce_sum(total, d) / max(all_reduce_sum(count, d), 1)


def pretraining_shards(
    cfg: RunConfig, run_dir: Path, out: Path, tokenizer: Tokenizer, d: Dist
) -> Path | None:
    """The directory of the pretraining corpus's token shards (train.npy for replay, val.npy
    for the forgetting figures), tokenized into DIR/sft/data unless an earlier stage already
    did it with this tokenizer; None when `sft.replay_corpus` is not set and the run has no
    corpus (an outside base model fine-tuned on outside data: nothing to replay)."""
    sc = cfg.sft
    if sc.replay_corpus:
        corpus = find_input(run_dir, sc.replay_corpus, "sft.replay_corpus", CORPUS_CANDIDATES)
    else:
        found = [run_dir / c for c in CORPUS_CANDIDATES if (run_dir / c).exists()]
        if not found:
            return None
        corpus = found[0]
    # the pretraining split, so that the validation windows are text the base never trained on
    reuse = [run_dir / "clean" / "tokens", run_dir / "pretrain" / "data"]
    val_fraction = cfg.pretrain.val_fraction
    data_dir = shards_for(corpus, tokenizer, val_fraction, reuse, out / "data", d.is_main)
    if d.world_size > 1:
        dist.barrier()
    return data_dir


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, segments


def _with_replay(batch: Batch, replay: tuple[torch.Tensor, torch.Tensor]) -> Batch:
    """Append replay windows, cut to the conversations' width, as extra rows of the batch
    (each window one segment of its own when the conversations are packed)."""
    x, y, segments = batch
    rx, ry = (t[:, : x.size(1)] for t in replay)
    if segments is not None:
        segments = torch.cat([segments, torch.zeros_like(rx)])
    return torch.cat([x, rx]), torch.cat([y, ry]), segments


def _loss(model, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """The mean loss over the answer tokens y marks, from logits computed at those tokens only
    (`Transformer.logits_at`: nothing runs past a row's last answer token, and the output layer
    not at prompts); packed rows attend within their own conversation (`segment_attention`)."""
    extra = segment_attention(segments.to(x.device)) if segments is not None else {}
    wanted = y != IGNORE_INDEX
    return masked_cross_entropy(model(x, wanted=wanted, **extra), y[wanted])


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, stage: str = "sft") -> dict:
    """Fine-tune into DIR/<stage>/ (ablations write their variants elsewhere than `sft`)."""
    timer = Timer()
    sc = cfg.sft
    d = setup_device(sc.device, sc.num_threads)
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage, cfg) if d.is_main else run_dir / stage
    base_dir = find_model_dir(run_dir, sc.model, "sft.model", ["pretrain"])
    model, tokenizer = load_model_dir(base_dir, d.device)
    if sc.init == "random":
        if sc.method == "lora":  # the adapter would record a base it was never trained on
            raise ConfigError("sft.method=lora needs sft.init=pretrained (adapters adapt a base)")
        torch.manual_seed(cfg.seed)
        model = Transformer(model.cfg).to(d.device)
    if sc.max_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"sft.max_len ({sc.max_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})"
        )
    token_ids = []
    if sc.method == "lora":
        torch.manual_seed(cfg.seed)  # the adapters' initialisation, and dropout, repeat
        apply_lora(model, sc.lora)
        if sc.lora.train_chat_tokens:
            markers = (tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id)
            token_ids = sorted({t for t in (*markers, tokenizer.end_id) if t is not None})
            train_token_rows(model, token_ids)
    trainable, total = count_trainable(model)

    # data: every 1/val_fraction-th conversation is validation
    data_path = find_input(run_dir, sc.data, "sft.data", ["world/sft_train.jsonl"])
    encoded = encode(read_conversations(data_path), tokenizer, sc.max_len)
    every = round(1 / sc.val_fraction) if sc.val_fraction else 0
    train = [e for i, e in enumerate(encoded.examples) if not every or i % every != every - 1]
    val = [e for i, e in enumerate(encoded.examples) if every and i % every == every - 1]
    n_train, n_val = len(train), len(val)
    if sc.packing:
        train, val = pack(train, sc.max_len), pack(val, sc.max_len)
    global_batch = sc.micro_batch_size * sc.grad_accum_steps * d.world_size
    train_data = SFTBatches(train, global_batch, cfg.seed, tokenizer.pad_id)
    val_data = SFTBatches(val, global_batch, cfg.seed, tokenizer.pad_id) if val else None
    max_steps = sc.max_steps or sc.epochs * train_data.steps_per_epoch

    # pretraining text: replay rows for training, held-out windows for the forgetting figures
    shards = pretraining_shards(cfg, run_dir, out, tokenizer, d)
    replay_fraction = sc.replay_fraction if shards is not None else 0.0
    if d.is_main and replay_fraction != sc.replay_fraction:
        console.print("sft: no pretraining corpus in this run (set sft.replay_corpus): no replay")
    replay_rows = 0
    if replay_fraction > 0:
        replay_rows = max(1, round(sc.micro_batch_size * replay_fraction / (1 - replay_fraction)))
        # windows of max_len tokens, cut to each batch's width: replay adds rows, not padding
        replay = TokenBatches(
            load_shard(shards / "train.npy"),
            sc.max_len,
            replay_rows * sc.grad_accum_steps * d.world_size,
            cfg.seed,
        )
    if d.is_main:
        for where in encoded.dropped[:20]:
            console.print(f"sft: dropped {where}: its first reply does not fit in {sc.max_len}")
        if len(encoded.dropped) > 20:
            console.print(
                f"sft: ... and {len(encoded.dropped) - 20} more (all in the summary count)"
            )
        console.print(
            f"sft: {n_train} train / {n_val} val conversations from {data_path}; "
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
    lm_eval = None
    if shards is not None:
        lm_windows = TokenBatches(
            load_shard(shards / "val.npy"),
            min(cfg.pretrain.seq_len, model.cfg.max_seq_len),
            sc.micro_batch_size,
            cfg.seed,
        )
        # at most LM_EVAL_WINDOWS windows, each rank scoring all of them on its own (no
        # collective), so the figure is the same for any number of processes
        lm_eval = partial(
            lm_loss,
            batches=lm_windows,
            n_batches=max(1, min(lm_windows.n_windows, LM_EVAL_WINDOWS) // sc.micro_batch_size),
            micro=sc.micro_batch_size,
            d=replace(d, rank=0, world_size=1),
            amp=amp,
        )
    # the base model's figures, once (kept across --resume)
    base_path = out / "base_eval.json"
    if d.is_main and not resume:
        base_path.unlink(missing_ok=True)
    if d.is_main and not base_path.exists():
        base = {"lm_loss_before": round(lm_eval(model), 6)} if lm_eval else {}
        if sc.eval_base:
            base.update({f"base_{k}": v for k, v in eval_chat(model).items()})
        write_json_atomic(base_path, base)
        console.print(f"sft: base model: {json.dumps(base)}")

    # before resuming: the measurement draws random numbers, and a resumed run must draw
    # (LoRA dropout) from exactly the RNG state its checkpoint restored
    peak = measure_matmul_flops(d.device, amp_dtype or torch.float32)
    optimizer = build_optimizer(model, sc.lr, sc.weight_decay, (sc.beta1, sc.beta2))
    ckpt_dir = out / "checkpoints"
    log = MetricsLog(out / "metrics.jsonl", enabled=d.is_main)
    start_step = 0
    if resume:
        expect = {
            "global_batch": global_batch,
            "examples": len(train),
            "replay_rows": replay_rows,
            "max_len": sc.max_len,
            "method": sc.method,
        }
        start_step = resume_latest(ckpt_dir, model, optimizer, log, expect, "sft")["step"]
    else:
        start_fresh(ckpt_dir, log)
    if d.world_size > 1:
        dist.barrier()

    train_model = DDP(model) if d.world_size > 1 else model
    if d.is_main:
        console.print(
            f"sft: {sc.method} fine-tuning of {trainable:,} of {total:,} parameters ({sc.init}), "
            f"{max_steps} steps x {global_batch} {'packed rows' if sc.packing else 'conversations'}"
            + (f" + {replay_rows} replay rows per micro-batch" if replay_rows else "")
            + f" on {d.device} x {d.world_size}"
        )

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
            if replay_rows:
                micro_batches = [
                    _with_replay(
                        batch, replay.micro_batch(step, m, replay_rows, d.rank, d.world_size)
                    )
                    for m, batch in enumerate(micro_batches)
                ]
            # the step's loss is the mean over all its loss tokens, on every rank together:
            # DDP averages the ranks' gradients, so each rank scales by world_size / total
            counts = [int((y != IGNORE_INDEX).sum()) for _, y, _ in micro_batches]
            scale = d.world_size / max(all_reduce_sum(sum(counts), d), 1)
            loss_sum = 0.0
            for m, ((x, y, segments), n) in enumerate(zip(micro_batches, counts)):
                x, y = x.to(d.device), y.to(d.device)
                last = m == sc.grad_accum_steps - 1
                sync = train_model.no_sync() if d.world_size > 1 and not last else nullcontext()
                with sync, amp():
                    loss = _loss(train_model, x, y, segments) * (n * scale)
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
                    evaluate_loss(model, val_data, sc.micro_batch_size, d, amp), 6
                )
                if d.is_main:
                    console.print(
                        f"step {done}: loss {loss_value:.4f}  val_loss {record['val_loss']:.4f}"
                    )
            log.write(**record)
            progress.update(done)
            if (done % sc.checkpoint_every == 0 or done == max_steps) and d.is_main:
                state = {
                    "global_batch": global_batch,
                    "examples": len(train),  # packed rows when packing: packing changes it
                    "replay_rows": replay_rows,
                    "max_len": sc.max_len,
                    "method": sc.method,
                    "loss": loss_value,
                }
                save_checkpoint(ckpt_dir, done, model, optimizer, state, sc.keep_last)

    if d.world_size > 1:
        dist.barrier()
    if not d.is_main:
        return {}
    lm_loss_after = round(lm_eval(model), 6) if lm_eval else None
    if sc.method == "lora":
        save_adapter(out / "adapter", model, sc.lora, str(base_dir), token_ids)
        merge_lora(model)
    records, val_loss = finish_training(out, model, tokenizer, log, "supervised fine-tuning")
    summary = {
        "val_loss": val_loss,
        "train_loss": round(loss_value, 6),
        "first_loss": records[0]["loss"] if records else None,
        "init": sc.init,
        "method": sc.method,
        "trainable_parameters": trainable,
        "trainable_fraction": round(trainable / total, 6),
        "replay_fraction": round(replay_rows / (sc.micro_batch_size + replay_rows), 4),
        "lm_loss_after": lm_loss_after,
        "base_model": str(base_dir),
        "steps": max_steps,
        "examples": n_train,
        "packed_rows": len(train) if sc.packing else None,
        "val_examples": n_val,
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
