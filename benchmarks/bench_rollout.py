"""lmforge's GRPO step vs TRL's GRPOTrainer, same model, prompts and generation length, in one run.

    python benchmarks/bench_rollout.py --model runs/default/sft [--steps 6] [--prompts 4]
        [--group 8] [--new-tokens 64] [--stop] [--out FILE.json]

One GRPO step = sample `group` replies to each of `prompts` prompts at temperature 1 (no
top-k/top-p), reward them (the world's verifiable answer), and update the policy once. Both
sides generate exactly `new-tokens` tokens per reply (TRL with min_new_tokens, lmforge without
a stop token), so they do the same work. With `--stop`, replies end at the end token as in
training, up to `new-tokens`: both sides sample the same model, so their replies are as long
on average (the mean reply lengths are reported), and what differs is what each does with a
reply that has ended. The model is the lmforge model directory and its
`lmforge export` twin; prompts are the world's word problems beside it (DIR/../world/
rl_train.jsonl). The first step of each is a warm-up and not timed; medians of the rest are
reported, with the ratio TRL / lmforge (above 1 means lmforge is faster), for the whole step
and for its rollout alone: sampling, rewards and advantages (TRL's
`_generate_and_score_completions`; lmforge also keeps each token's log-probability). Needs
`trl`.
"""

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
from lmforge.generate import sample_completions
from lmforge.io import load_model_dir
from lmforge.model.hf import export_hf
from lmforge.rewards import verifiable_reward
from lmforge.rollout import Rollout
from lmforge.stages.grpo import advantages, policy_update
from lmforge.train_utils import build_optimizer


def lmforge_step_times(
    model_dir: Path, records: list[dict], args
) -> tuple[list[float], list[float], list[float]]:
    """Seconds of each timed step and of its rollout (sampling, rewards, advantages), and its
    mean reply length in tokens."""
    policy, tokenizer = load_model_dir(model_dir)
    gc = GRPOConfig(group_size=args.group, max_new_tokens=args.new_tokens, lr=1e-6)
    optimizer = build_optimizer(policy, gc.lr, 0.0, (0.9, 0.95))
    times, rollout_times, reply_tokens = [], [], []
    for step in range(args.steps):
        batch = records[step * args.prompts : (step + 1) * args.prompts]
        start = time.perf_counter()
        prompts = [
            tokenizer.render_chat(r["messages"], add_generation_prompt=True)[0] for r in batch
        ]
        policy.eval()
        rows = sample_completions(
            policy,
            [p for p in prompts for _ in range(args.group)],
            args.new_tokens,
            stop_ids=[tokenizer.end_id, tokenizer.eos_id] if args.stop else (),
            pad_id=tokenizer.pad_id,
            seed=step,
            with_logprobs=True,
        )
        reply_tokens.append(statistics.mean(len(c.tokens) for c in rows))
        texts = [tokenizer.decode(c.tokens) for c in rows]
        rewards = torch.tensor(
            [verifiable_reward(batch[i // args.group], t) for i, t in enumerate(texts)]
        )
        adv = advantages(rewards.view(len(batch), args.group), gc).flatten()
        rollout_times.append(time.perf_counter() - start)
        rollouts = [
            Rollout(
                i // args.group, prompts[i // args.group], c.tokens, c.logprobs, t, not c.stopped
            )
            for i, (c, t) in enumerate(zip(rows, texts))
        ]
        policy_update(
            policy, None, optimizer, rollouts, adv, gc, tokenizer.pad_id, torch.device("cpu")
        )
        times.append(time.perf_counter() - start)
    return times[1:], rollout_times[1:], reply_tokens[1:]


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
            generation_kwargs={} if args.stop else {"min_new_tokens": args.new_tokens},
            max_steps=args.steps,
            learning_rate=1e-6,
            temperature=1.0,
            beta=0.0,
            num_iterations=1,
            use_cpu=True,
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
    parser.add_argument("--stop", action="store_true", help="replies end at the end token")
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    prompts_file = args.model.parent / "world" / "rl_train.jsonl"
    if not prompts_file.exists():
        raise SystemExit(f"no prompts at {prompts_file}: run the pipeline into {args.model.parent}")
    records = read_prompts(prompts_file)[: args.steps * args.prompts]
    torch.manual_seed(0)
    ours, our_rollouts, our_lengths = lmforge_step_times(args.model, records, args)
    theirs, their_rollouts, their_lengths = trl_step_times(args.model, records, args)
    step, rollout = statistics.median(ours), statistics.median(our_rollouts)
    trl_step, trl_rollout = statistics.median(theirs), statistics.median(their_rollouts)
    # tokens/s count the tokens each side sampled: every reply's new_tokens, or with --stop
    # its mean reply length (the same on average)
    length, trl_length = statistics.mean(our_lengths), statistics.mean(their_lengths)
    tokens, trl_tokens = (args.prompts * args.group * n for n in (length, trl_length))
    results = {
        "threads": torch.get_num_threads(),
        "samples_per_step": args.prompts * args.group,
        "new_tokens": args.new_tokens,
        "stop": args.stop,
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
