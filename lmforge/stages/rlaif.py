"""Stage `rlaif`: reinforcement learning from AI feedback, with DPO as the optimiser.

    SFT model ──2 replies per prompt──▶ AI judge (constitution) ──pairs──▶ DPO ──▶ DIR/rlaif/dpo/

The run's SFT model answers each of `rlaif.prompts` world training prompts twice (temperature
1). The judge (`judge.Judge`; by default the SFT model itself, i.e. self-rewarding) compares
the two replies under the constitution, in both orders, and the reply it prefers becomes
`chosen` (Bai et al. 2022, Lee et al. 2023). No human or simulated annotator label is used;
the world's gold scorer only measures the judge afterwards. The pairs go to
DIR/rlaif/pairs.jsonl, and DPO (the `dpo` section's settings) trains the SFT model on them
into DIR/rlaif/dpo/, with the same gold comparison against the SFT model as the `dpo` stage.

Figures (DIR/rlaif/summary.json):
- `judge_gold_agreement`: of the kept pairs whose replies differ in gold score, the share where
  the judge preferred the gold-better one (0.5 is chance);
- `position_consistency`: the share of pairs whose two orders were judged alike;
- `pairs_kept` (of `pairs_judged`), and the DPO stage's `win_rate_vs_sft`, `kl_to_ref`, ...
  prefixed `dpo_`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.data.readers import read_records
from lmforge.eval.gold import sample_replies, spread
from lmforge.io import load_model_dir, write_jsonl_atomic
from lmforge.judge import Judge, read_constitution
from lmforge.runs import Timer, find_input, find_model_dir, stage_dir, write_summary
from lmforge.stages import dpo
from lmforge.train_utils import console, one_process_only, setup_device
from lmforge.world.scoring import gold_score

PROMPTS_PER_CALL = 16


def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Label pairs of the SFT model's replies with the AI judge, then DPO on them."""
    timer = Timer()
    rc = cfg.rlaif
    run_dir = Path(run_dir)
    one_process_only("rlaif")
    out = stage_dir(run_dir, "rlaif", cfg)
    d = setup_device(cfg.dpo.device, cfg.dpo.num_threads)
    policy_dir = find_model_dir(run_dir, cfg.dpo.model, "dpo.model", ["sft", "pretrain"])
    policy, tokenizer = load_model_dir(policy_dir, d.device)
    judge_dir = find_model_dir(run_dir, rc.judge, "rlaif.judge", ["sft", "pretrain"])
    judge_model = policy if judge_dir == policy_dir else load_model_dir(judge_dir, d.device)[0]
    judge = Judge(judge_model, tokenizer, read_constitution(rc.constitution))
    data = find_input(run_dir, None, "rlaif prompts", ["world/pref_train.jsonl"])
    records = spread([r for _, r in read_records(data)], rc.prompts)
    contexts = [r["messages"] for r in records]

    sampled = sample_replies(
        policy, tokenizer, contexts, 2, rc.max_new_tokens, cfg.seed, PROMPTS_PER_CALL
    )
    a = [tokenizer.decode(replies[0]) for _, _, replies in sampled]
    b = [tokenizer.decode(replies[1]) for _, _, replies in sampled]
    sample_seconds = timer.seconds
    verdict = judge.prefer(contexts, a, b)
    p_a = verdict["p_a"].tolist()
    consistent = ((verdict["p_a_first"] > 0.5) == (verdict["p_a_second"] > 0.5)).float()

    pairs, agree, scored = [], 0, 0
    for record, x, y, p in zip(records, a, b, p_a):
        if x.strip() == y.strip() or abs(p - 0.5) < rc.min_confidence:
            continue
        chosen, rejected = (x, y) if p > 0.5 else (y, x)
        pairs.append({"messages": record["messages"], "chosen": chosen, "rejected": rejected})
        if "kind" in record:
            gold = [
                gold_score(record["kind"], record["lang"], t, record.get("answer", ""))["score"]
                for t in (chosen, rejected)
            ]
            if gold[0] != gold[1]:
                scored += 1
                agree += gold[0] > gold[1]
    if not pairs:
        raise ValueError("rlaif: the judge kept no pair (lower rlaif.min_confidence)")
    pairs_path = out / "pairs.jsonl"
    write_jsonl_atomic(pairs_path, pairs)
    summary = {
        "judge": str(judge_dir),
        "self_rewarding": judge_dir == policy_dir,
        "pairs_judged": len(records),
        "pairs_kept": len(pairs),
        "judge_gold_agreement": round(agree / scored, 4) if scored else None,
        "gold_distinct_pairs": scored,
        "position_consistency": round(consistent.mean().item(), 4),
        "sample_seconds": sample_seconds,
        "judge_seconds": round(timer.seconds - sample_seconds, 2),
    }
    console.print(f"rlaif: {json.dumps(summary)}")

    dpo_cfg = cfg.model_copy(deep=True)
    dpo_cfg.dpo.data = str(pairs_path)
    dpo_cfg.dpo.model = str(policy_dir)
    trained = dpo.run(dpo_cfg, run_dir, stage="rlaif/dpo")
    keep = ("win_rate_vs_sft", "win_rate_vs_sft_greedy", "gold_mean", "gold_mean_sft", "kl_to_ref")
    summary |= {f"dpo_{k}": trained[k] for k in keep if k in trained}
    summary.update(seconds=timer.seconds, device=f"{d.device.type} x 1")
    return write_summary(out, summary)
