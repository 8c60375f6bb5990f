"""`lmforge experiment overoptimization`: reward over-optimisation, measured with the gold scorer.

In an existing run (its SFT model and world), a *proxy* reward model is trained on a limited
number of the world's comparisons (`proxy_prompts` prompts): their written rankings and, with
`policy_rankings` (where the run's `rm` stage left DIR/rm/policy_rankings.jsonl), the
simulated annotators' rankings of the SFT model's own replies to the same prompts, as a
reward model is trained in practice. Either way it has seen few of the ways the policy can go
wrong. The SFT model is then optimised against it:

- with PPO at each KL coefficient of `betas` (0 included), following the proxy score, the
  gold score and KL(policy || SFT) every `eval_every` steps on held-out prompts
  (`stages.ppo.probe`);
- with best-of-N for N = 1 ... 64, whose KL to the SFT model is log N - (N - 1) / N
  (Stiennon et al. 2020).

Written to DIR/experiments/overoptimization/: `overoptimization.png` (proxy and gold score
against KL, one line per beta and one for best-of-N), `report.md` (a table), `report.json`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.eval.gold import sample_replies, spread
from lmforge.io import load_model_dir, write_json_atomic, write_jsonl_atomic, write_text_atomic
from lmforge.model.reward import load_reward_model, score
from lmforge.stages import ppo, rm
from lmforge.train_utils import MetricsLog, console, one_process_only
from lmforge.world.scoring import gold_score

NAME = "experiments/overoptimization"
BEST_OF = (1, 2, 4, 8, 16, 32, 64)


def best_of_n_curve(
    run_dir: Path, proxy_dir: Path, records: list[dict], cfg: RunConfig
) -> list[dict]:
    """Proxy and gold score of the proxy's pick among N samples of the SFT model, with the
    analytic KL of best-of-N, for each N in BEST_OF (64 samples per prompt, disjoint groups)."""
    policy, tokenizer = load_model_dir(run_dir / "sft")
    proxy, proxy_tokenizer, _ = load_reward_model(proxy_dir)
    n_max = BEST_OF[-1]
    sampled = sample_replies(
        policy,
        tokenizer,
        [r["messages"] for r in records],
        n_max,
        cfg.ppo.max_new_tokens,
        cfg.seed,
        4,
    )
    picks: dict[int, list[tuple[float, float]]] = {n: [] for n in BEST_OF}
    for r, (_, _, samples) in zip(records, sampled):
        texts = [tokenizer.decode(s) for s in samples]
        proxy_scores = score(
            proxy, proxy_tokenizer, [(r["messages"], t) for t in texts], proxy.trunk.cfg.max_seq_len
        )
        gold = [gold_score(r["kind"], r["lang"], t, r["answer"])["score"] for t in texts]
        for n in BEST_OF:
            for g in range(0, n_max, n):
                j = max(range(g, g + n), key=lambda i: proxy_scores[i])
                picks[n].append((proxy_scores[j], gold[j]))
    return [
        {
            "n": n,
            "kl": round(math.log(n) - (n - 1) / n, 4),
            "proxy": round(statistics.fmean(p for p, _ in picks[n]), 4),
            "gold": round(statistics.fmean(g for _, g in picks[n]), 4),
        }
        for n in BEST_OF
    ]


def plot(curves: dict[str, list[dict]], best_of: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax, label in (("proxy", axes[0], "proxy reward"), ("gold", axes[1], "gold score")):
        for name, points in curves.items():
            ax.plot([p["kl"] for p in points], [p[key] for p in points], marker="o", label=name)
        ax.plot(
            [p["kl"] for p in best_of],
            [p[key] for p in best_of],
            "k--",
            marker="s",
            label="best-of-N",
        )
        ax.set_xlabel("KL(policy || SFT), nats per reply")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Optimising a proxy reward model: proxy and gold score against KL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overoptimization(cfg: RunConfig, run_dir: Path) -> dict:
    """Run the experiment of the module docstring in `run_dir`; returns the report."""
    one_process_only("the over-optimisation experiment")
    run_dir = Path(run_dir)
    xc = cfg.overoptimization
    out = run_dir / NAME
    out.mkdir(parents=True, exist_ok=True)
    written = [
        json.loads(line) for line in (run_dir / "world" / "pref_train.jsonl").open(encoding="utf-8")
    ]
    chosen = spread(list(range(len(written))), xc.proxy_prompts)
    proxy_data = [written[i] for i in chosen]
    ranked = run_dir / "rm" / "policy_rankings.jsonl"  # one line per pref_train prompt
    policy_ranked = 0
    if xc.policy_rankings and ranked.exists():
        own = [json.loads(line) for line in ranked.open(encoding="utf-8")]
        if len(own) != len(written):
            raise ValueError(f"{ranked}: {len(own)} rankings for {len(written)} prompts")
        proxy_data += [own[i] for i in chosen]
        policy_ranked = len(chosen)
    write_jsonl_atomic(out / "proxy_data.jsonl", proxy_data)
    console.rule("[bold]proxy reward model")
    rm_cfg = cfg.model_copy(deep=True)
    rm_cfg.rm.data = str(out / "proxy_data.jsonl")
    rm_cfg.rm.policy_samples = 0
    rm_cfg.rm.best_of_prompts = 0
    rm_cfg.rm.model = str(run_dir / "sft")
    proxy_summary = rm.run(rm_cfg, run_dir, stage=f"{NAME}/proxy_rm")
    proxy_dir = run_dir / NAME / "proxy_rm" / "model"

    held = [
        json.loads(line) for line in (run_dir / "world" / "pref_eval.jsonl").open(encoding="utf-8")
    ]
    probes = spread(held, cfg.ppo.probe_prompts)
    console.rule("[bold]best-of-N against the proxy")
    best_of = best_of_n_curve(run_dir, proxy_dir, probes, cfg)
    curves: dict[str, list[dict]] = {}
    for beta in xc.betas:
        name = f"PPO beta={beta:g}"
        console.rule(f"[bold]{name}")
        ppo_cfg = cfg.model_copy(deep=True)
        ppo_cfg.ppo.kl_coef = beta
        ppo_cfg.ppo.reward_model = str(proxy_dir)
        ppo_cfg.ppo.model = str(run_dir / "sft")
        ppo_cfg.ppo.eval_every = xc.eval_every
        ppo_cfg.ppo.steps = xc.ppo_steps
        ppo_cfg.ppo.lr = xc.ppo_lr
        ppo_cfg.ppo.eval_prompts = xc.eval_prompts
        stage = f"{NAME}/ppo_beta_{beta:g}"
        ppo.run(ppo_cfg, run_dir, stage=stage)
        records = MetricsLog(run_dir / stage / "metrics.jsonl").read()
        curves[name] = [
            {
                "step": r["step"] - 1,
                "kl": r["eval_kl"],
                "proxy": r["eval_proxy"],
                "gold": r["eval_gold"],
            }
            for r in records
            if "eval_gold" in r
        ]
    plot(curves, best_of, out / "overoptimization.png")
    report = {
        "proxy_prompts": xc.proxy_prompts,
        "proxy_policy_rankings": policy_ranked,
        "proxy_pair_accuracy": proxy_summary.get("pair_accuracy"),
        "probe_prompts": len(probes),
        "best_of_n": best_of,
        "ppo": curves,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", report_table(report))
    return report


def report_table(report: dict) -> str:
    """The report as Markdown: one row per policy, from the SFT model to the last point."""
    lines = [
        "# Reward over-optimisation",
        "",
        f"Proxy reward model: {report['proxy_prompts']} ranked prompts (and rankings of the SFT "
        f"model's own replies to {report['proxy_policy_rankings']} of them), held-out pair accuracy "
        f"{report['proxy_pair_accuracy']}. Scores on {report['probe_prompts']} held-out prompts, "
        "one sampled reply each (best-of-N: 64 samples per prompt).",
        "",
        "| policy | KL | proxy | gold | peak gold (at KL) |",
        "|---|---|---|---|---|",
    ]
    for name, points in report["ppo"].items():
        last, peak = points[-1], max(points, key=lambda p: p["gold"])
        lines.append(
            f"| {name}, step {last['step']} | {last['kl']:.2f} | {last['proxy']:.3f} | "
            f"{last['gold']:.3f} | {peak['gold']:.3f} ({peak['kl']:.2f}) |"
        )
    for p in report["best_of_n"]:
        lines.append(f"| best-of-{p['n']} | {p['kl']:.2f} | {p['proxy']:.3f} | {p['gold']:.3f} | |")
    return "\n".join(lines) + "\n"
