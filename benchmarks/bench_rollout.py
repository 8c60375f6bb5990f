"""lmforge's GRPO step vs TRL's GRPOTrainer, same model, prompts and generation length, in one run.

    python benchmarks/bench_rollout.py --model runs/default/sft [--steps 6] [--prompts 4]
        [--group 8] [--new-tokens 64] [--bf16] [--out FILE.json]

One GRPO step = sample `group` replies to each of `prompts` prompts at temperature 1 (no
top-k/top-p), each reply ending at the end token or after `new-tokens` tokens, reward them
(the world's verifiable answer) and update the policy once. lmforge's step is the GRPO
stage's own (`grpo.grpo_step`): a group whose rewards are all equal has no advantage and is
left out of the update (the share of groups learned from is reported), while TRL's step
computes the loss over every reply. Both sides sample the same model, so their replies are
as long on average (the mean reply lengths are reported). The model is the lmforge model
directory and its `lmforge export` twin; prompts are the world's word problems beside it
(DIR/../world/rl_train.jsonl). The first step of each is a warm-up and not timed; medians of
the rest are reported, with the ratio TRL / lmforge (above 1 means lmforge is faster), for
the whole step and for its rollout alone: sampling, rewards and advantages (TRL's
`_generate_and_score_completions`; lmforge also keeps each token's log-probability). With
`--bf16` both sides train in mixed precision: lmforge's linear layers multiply in bf16
(`grpo.matmul_dtype=bfloat16`), TRL runs with `bf16=True` (autocast). Needs `trl`."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import GRPOConfig
from lmforge.data.prompts import read_prompts
from lmforge.io import load_model_dir
from lmforge.model.hf import export_hf
from lmforge.rewards import build_reward, verifiable_reward
from lmforge.rollout import reply_seeds
from lmforge.stages.grpo import grpo_step
from lmforge.train_utils import build_optimizer


def lmforge_step_times(
    model_dir: Path, records: list[dict], args
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds of each timed step and of its rollout (sampling, rewards, advantages), its
    mean reply length in tokens, and the share of its groups the update learned from: the
    GRPO stage's own step (`grpo.grpo_step`), which leaves out groups whose rewards are all
    equal."""
    policy, tokenizer = load_model_dir(model_dir)
    gc = GRPOConfig(group_size=args.group, max_new_tokens=args.new_tokens, lr=1e-6)
    optimizer = build_optimizer(policy, gc.lr, 0.0, (0.9, 0.95))
    reward = build_reward(gc, "grpo", model_dir.parent, policy, tokenizer, torch.device("cpu"))
    times, rollout_times, reply_tokens, learned = [], [], [], []
    with policy.matmuls_in(torch.bfloat16 if args.bf16 else None):
        for step in range(args.steps):
            indices = list(range(step * args.prompts, (step + 1) * args.prompts))
            seeds = reply_seeds(0, step, 0, args.prompts * args.group)
            start = time.perf_counter()
            result = grpo_step(
                policy, None, optimizer, tokenizer, records, indices, reward, gc, seeds
            )
            times.append(time.perf_counter() - start)
            rollout_times.append(result.rollout_seconds)
            reply_tokens.append(statistics.mean(len(r.tokens) for r in result.rollouts))
            learned.append(1 - result.skipped_groups / args.prompts)
    return times[1:], rollout_times[1:], reply_tokens[1:], learned[1:]


def trl_step_times(
    model_dir: Path, records: list[dict], args
) -> tuple[list[float], list[float], list[float]]:
    """As `lmforge_step_times`; TRL's rollout is `_generate_and_score_completions`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.start)

    def reward(completions, answer, **_) -> list[float]:
        return [
            verifiable_reward({"answer": a}, c[0]["content"]) for c, a in zip(completions, answer)
        ]

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        export_hf(model_dir, hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        data = Dataset.from_list(
            [{"prompt": r["messages"], "answer": r["answer"]} for r in records]
        )
        config = TRLConfig(
            output_dir=str(Path(tmp) / "out"),
            per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group,
            max_completion_length=args.new_tokens,
            max_steps=args.steps,
            learning_rate=1e-6,
            temperature=1.0,
            beta=0.0,
            num_iterations=1,
            use_cpu=True,
            bf16=args.bf16,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            shuffle_dataset=False,
            disable_tqdm=True,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        rollout_times, reply_tokens = [], []
        generate_and_score = trainer._generate_and_score_completions

        def timed_rollout(inputs):
            start = time.perf_counter()
            out = generate_and_score(inputs)
            rollout_times.append(time.perf_counter() - start)
            reply_tokens.append(out["completion_mask"].sum(1).float().mean().item())
            return out

        trainer._generate_and_score_completions = timed_rollout
        trainer.train()
    return timer.times[1:], rollout_times[1:], reply_tokens[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/default/sft"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="both sides in mixed precision")
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    prompts_file = args.model.parent / "world" / "rl_train.jsonl"
    if not prompts_file.exists():
        raise SystemExit(f"no prompts at {prompts_file}: run the pipeline into {args.model.parent}")
    records = read_prompts(prompts_file)[: args.steps * args.prompts]
    torch.manual_seed(0)
    ours, our_rollouts, our_lengths, learned = lmforge_step_times(args.model, records, args)
    theirs, their_rollouts, their_lengths = trl_step_times(args.model, records, args)
    step, rollout = statistics.median(ours), statistics.median(our_rollouts)
    trl_step, trl_rollout = statistics.median(theirs), statistics.median(their_rollouts)
    # tokens/s count the tokens each side sampled (its mean reply length: the same on average)
    length, trl_length = statistics.mean(our_lengths), statistics.mean(their_lengths)
    tokens, trl_tokens = (args.prompts * args.group * n for n in (length, trl_length))
    results = {
        "threads": torch.get_num_threads(),
        "precision": "bf16" if args.bf16 else "float32",
        "samples_per_step": args.prompts * args.group,
        "new_tokens": args.new_tokens,
        "groups_learned_from_lmforge": round(statistics.mean(learned), 3),
        "reply_tokens_lmforge": round(length, 1),
        "reply_tokens_trl": round(trl_length, 1),
        "step_seconds_lmforge": round(step, 3),
        "step_seconds_trl": round(trl_step, 3),
        "tokens_per_s_lmforge": round(tokens / step, 1),
        "tokens_per_s_trl": round(trl_tokens / trl_step, 1),
        "rollout_seconds_lmforge": round(rollout, 3),
        "rollout_seconds_trl": round(trl_rollout, 3),
        "rollout_tokens_per_s_lmforge": round(tokens / rollout, 1),
        "rollout_tokens_per_s_trl": round(trl_tokens / trl_rollout, 1),
        "ratio": round(trl_step / step, 2),
        "rollout_ratio": round(trl_rollout / rollout, 2),
    }
    for key, value in results.items():
        print(f"{key:30s} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
