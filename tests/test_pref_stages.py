"""Learning from preferences: the reward model, best-of-N, DPO and its family, KTO; the tiny
pipeline end to end (the `tiny_run` fixture), and HH-RLHF where it is present."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ENV, lmforge, losses, torchrun_stage

from lmforge.config import ModelConfig, load_config
from lmforge.data.preferences import Pair
from lmforge.eval.gold import kl_to_reference, win_rate
from lmforge.io import CheckpointError, load_model_dir, load_tensors
from lmforge.model import Transformer
from lmforge.model.reward import RewardModel, length_chunks, load_reward_model, score
from lmforge.stages import dpo, rm

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
HH = ROOT.parent / "shared" / "data" / "hh_rlhf" / "helpful-base" / "test.jsonl.gz"


def summary(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "summary.json").read_text())


def test_reward_model_beats_chance_and_best_of_n_is_reported(tiny_run):
    s = summary(tiny_run, "rm")
    # annotators who agree on ~70% of pairs; a reward model trained on one of them
    assert 0.6 <= s["annotator_agreement"] <= 0.85
    assert s["pair_accuracy"] > 0.55 and s["pair_accuracy_gold"] > 0.55
    assert s["accuracy_vs_ceiling"] == pytest.approx(
        s["pair_accuracy"] / s["annotator_agreement"], abs=1e-3
    )
    # every world prompt once as written, once as the SFT model's own 4 replies
    assert s["policy_rankings"] == s["data_records"] and s["train_prompts"] == 2 * s["data_records"]
    written = [json.loads(x) for x in (tiny_run / "world" / "pref_train.jsonl").open()]
    sampled = [json.loads(x) for x in (tiny_run / "rm" / "policy_rankings.jsonl").open()]
    assert [r["messages"] for r in sampled] == [r["messages"] for r in written]
    assert all(len(r["responses"]) == 4 and sorted(r["ranking"]) == [0, 1, 2, 3] for r in sampled)
    for n in (1, 2, 4, 8, 16, 32, 64):
        assert 0.0 <= s[f"gold_best_of_{n}"] <= 8.0
    assert (tiny_run / "rm" / "best_of_n.png").stat().st_size > 1000
    # the stored statistics are those of the held-out rewards the stage measured
    model, tokenizer, stats = load_reward_model(tiny_run / "rm" / "model")
    assert stats["reward_mean"] == s["reward_mean"] and stats["reward_std"] == s["reward_std"]
    held = [json.loads(line) for line in (tiny_run / "world" / "pref_eval.jsonl").open()]
    rewards = score(
        model, tokenizer, [(r["messages"], t) for r in held for t in r["responses"]], 128
    )
    assert sum(rewards) / len(rewards) == pytest.approx(s["reward_mean"], abs=1e-3)


def test_dpo_and_kto_move_the_policy_and_report_gold_figures(tiny_run):
    for stage in ("dpo", "kto"):
        s = summary(tiny_run, stage)
        # every held-out prompt, 4 sampled replies of each model, the i-th against the i-th
        compared = s["eval_prompts"] * s["eval_samples_per_prompt"]
        assert s["wins"] + s["losses"] + s["ties"] == compared > 0
        assert s["win_rate_vs_sft"] == pytest.approx(
            (s["wins"] + s["ties"] / 2) / compared, abs=1e-4
        )
        assert 0.0 <= s["win_rate_vs_sft_greedy"] <= 1.0
        assert 0.0 <= s["gold_mean_greedy"] <= 8.0 and 0.0 <= s["gold_mean_sft_greedy"] <= 8.0
        assert s["kl_to_ref"] > 0.0  # the policy moved away from the SFT model
        trained, _ = load_model_dir(tiny_run / stage)
        sft, _ = load_model_dir(tiny_run / "sft")
        assert not torch.equal(trained.lm_head.weight, sft.lm_head.weight)
    records = [json.loads(x) for x in (tiny_run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    # the implicit reward orders the training pairs better at the end than at the start
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference
    assert summary(tiny_run, "dpo")["reward_accuracy"] > 0.55


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_every_dpo_variant_trains(tiny_run, loss):
    stage = f"dpo_{loss}"
    cfg = load_config(
        Path(TINY), [f"dpo.loss={loss}", "dpo.max_steps=6", "dpo.kl_prompts=2", "dpo.lr=1e-3"]
    )
    s = dpo.run(cfg, tiny_run, stage=stage)
    assert s["loss_name"] == loss and s["steps"] == 6
    losses = [json.loads(x)["loss"] for x in (tiny_run / stage / "metrics.jsonl").open()]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 6


def test_pair_loss_scores_each_distinct_reply_once_and_starts_at_log_2(tmp_path, tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    model = RewardModel(Transformer(cfg))
    messages = [{"role": "user", "content": "capital?"}]
    replies = ["Velmar.", "Velmar is the capital.", "I don't know.", "No."]
    ranking_pairs = [
        Pair(messages, replies[a], replies[b], "f:1", weight=1 / 6)
        for i, a in enumerate(range(4))
        for b in range(i + 1, 4)
    ]
    other = [Pair(messages, "yes", "no", "f:2")]
    loss, accuracy, tokens = rm.pair_loss(model, tokenizer, [ranking_pairs, other], 64, 0.0)
    # a zero head gives every reply reward 0: each pair's loss is log 2, and none is "right"
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and accuracy == 0.0
    lengths = [
        len(tokenizer.render_chat([*messages, {"role": "assistant", "content": r}])[0])
        for r in [*replies, "yes", "no"]
    ]
    assert tokens == sum(lengths)  # 4 + 2 distinct replies, not 2 x 7 pair members
    assert rm.group_pairs(ranking_pairs + other) == [ranking_pairs, other]


def test_reward_model_runs_rows_in_length_chunks_with_the_same_rewards():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1)
    model = RewardModel(Transformer(cfg))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    lengths = torch.tensor([5, 40, 12, 40, 3, 27])
    ids = torch.randint(1, 64, (6, 40))
    whole = model(ids, lengths, chunk_tokens=10**9)  # every row padded to 40
    chunked = model(ids, lengths, chunk_tokens=48)
    assert torch.allclose(whole, chunked, atol=1e-5) and whole.abs().min() > 0
    # ascending lengths, at most 48 padded tokens a chunk; a longer row runs alone
    sorted_lengths = sorted(lengths.tolist())
    assert length_chunks(sorted_lengths, 48) == [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)]
    assert length_chunks([100], 48) == [slice(0, 1)] and length_chunks([], 48) == []


def test_length_chunks_compute_the_fewest_tokens_within_the_budget():
    """Against every way to cut short lists: the chosen chunks cost least (padded tokens plus
    the overhead per chunk), and only a single row goes over the budget."""
    rng = random.Random(0)

    def cost(chunks, lengths, overhead):
        return sum((c.stop - c.start) * lengths[c.stop - 1] + overhead for c in chunks)

    for _ in range(200):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 8)))
        budget, overhead = rng.choice([40, 100, 10**6]), rng.choice([0, 16, 64])
        chunks = length_chunks(lengths, budget, overhead)
        assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(len(lengths)))
        assert all(
            c.stop - c.start == 1 or (c.stop - c.start) * lengths[c.stop - 1] <= budget
            for c in chunks
        )
        best = math.inf
        for mask in range(2 ** (len(lengths) - 1)):  # bit k set: a cut after row k
            cuts = [0] + [k + 1 for k in range(len(lengths) - 1) if mask >> k & 1] + [len(lengths)]
            cand = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
            if all(
                c.stop - c.start == 1 or (c.stop - c.start) * lengths[c.stop - 1] <= budget
                for c in cand
            ):
                best = min(best, cost(cand, lengths, overhead))
        assert cost(chunks, lengths, overhead) == best


def test_best_worst_keeps_a_rankings_extremes():
    m = [{"role": "user", "content": "q"}]
    order = ["a", "b", "c", "d"]  # best first
    pairs = [
        Pair(m, x, y, "f:1", weight=1 / 6) for i, x in enumerate(order) for y in order[i + 1 :]
    ]
    kept = dpo.best_worst([*pairs, Pair(m, "y", "n", "f:2")])
    assert [(p.chosen, p.rejected, p.weight) for p in kept] == [("a", "d", 1.0), ("y", "n", 1.0)]


def test_win_rate_counts_ties_as_half():
    assert win_rate([3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 4.0, 5.0]) == {
        "win_rate": 0.5,
        "wins": 1,
        "losses": 1,
        "ties": 2,
    }
    assert win_rate([2.0, 2.0], [1.0, 1.5])["win_rate"] == 1.0


def test_a_policy_has_zero_kl_to_itself(tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    records = [{"messages": [{"role": "user", "content": "hi"}]}] * 2
    assert kl_to_reference(model, model, tokenizer, records, 8, seed=0) == 0.0
    other = Transformer(cfg).eval()
    assert kl_to_reference(model, other, tokenizer, records, 8, seed=0) > 0.0


def test_best_of_n_from_the_command_line(tiny_run):
    args = ["generate", "How do I make a kite?", "--model", tiny_run / "sft"]
    proc = lmforge(*args, "--best-of", "4", "--reward-model", tiny_run / "rm" / "model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best of 4]" in proc.stdout and "[reward " in proc.stdout
    proc = lmforge(*args, "--best-of", "4")
    assert proc.returncode != 0 and "--best-of needs --reward-model" in proc.stderr


def test_a_damaged_reward_head_is_a_clear_error(tiny_run, tmp_path):
    copy = tmp_path / "rm"
    shutil.copytree(tiny_run / "rm" / "model", copy)
    head = copy / "reward_head.safetensors"
    head.write_bytes(head.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="reward_head.safetensors"):
        load_reward_model(copy)


@pytest.mark.skipif(not HH.exists(), reason=f"HH-RLHF not found at {HH}")
def test_reward_model_and_dpo_on_hh_rlhf(tiny_run):
    common = [f"rm.data={HH}", "rm.skip_bad=true", "rm.max_steps=30", "rm.batch_size=8"]
    common.append(f"rm.model={tiny_run / 'sft'}")  # a model directory, as users give it
    s = rm.run(load_config(Path(TINY), common), tiny_run, stage="rm_hh")
    assert s["eval_pairs"] > 200 and s["data_skipped"] == 7 and s["data_dropped_identical"] == 2
    assert 0.0 <= s["pair_accuracy"] <= 1.0 and "annotator_agreement" not in s
    cfg = load_config(Path(TINY), [f"dpo.data={HH}", "dpo.skip_bad=true", "dpo.max_steps=4"])
    d = dpo.run(cfg, tiny_run, stage="dpo_hh")
    assert d["data_pairs"] > 2000 and d["pairs"] == d["data_pairs"] and d["steps"] == 4


# a stage's figures that a resumed run must reproduce, and the file of its trained weights
RESUMABLE = {
    "rm": (["pair_accuracy", "reward_mean", "reward_std", "gold_best_of_4"], "model/model"),
    "dpo": (["train_loss", "reward_accuracy", "win_rate_vs_sft", "kl_to_ref"], "model"),
    "kto": (["train_loss", "win_rate_vs_sft", "kl_to_ref"], "model"),
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_preference_stages_resume_exactly_from_their_newest_checkpoint(stage, tiny_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for earlier in ("world", "tokenizer", "pretrain", "sft"):
        (out / earlier).symlink_to(tiny_run / earlier)
    args = [stage, "--config", TINY, "--out", out, f"{stage}.max_steps=4"]
    args += [f"{stage}.checkpoint_every=2", "rm.best_of_prompts=4", "rm.policy_samples=2"]
    assert lmforge(*args).returncode == 0
    metrics = out / stage / "metrics.jsonl"
    whole = [json.loads(x) for x in metrics.open()]
    first = summary(out, stage)
    figures, weights_file = RESUMABLE[stage]
    weights = load_tensors(out / stage / f"{weights_file}.safetensors")
    # as if killed after the checkpoint of step 2: that checkpoint is the newest
    shutil.rmtree(out / stage / "checkpoints" / "step_00000004")
    proc = lmforge(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "step 2" in proc.stderr
    assert [json.loads(x) for x in metrics.open()] == whole and len(whole) == 4
    again = summary(out, stage)
    for key in figures:
        assert again[key] == first[key], key
    for name, tensor in load_tensors(out / stage / f"{weights_file}.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    # another batch size would draw other items at the same step: refused, naming both
    shutil.rmtree(out / stage / "checkpoints" / "step_00000004")
    proc = lmforge(*args, "--resume", f"{stage}.batch_size=3")
    assert proc.returncode == 2 and "batch_size 3" in proc.stderr, proc.stderr
    # a fresh run sets the earlier run's checkpoints aside, where --resume does not look
    assert lmforge(*args).returncode == 0
    assert [p.name for p in (out / stage / "checkpoints.previous").iterdir()] == ["step_00000002"]


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_two_processes_match_one_process(stage, tiny_run, tmp_path):
    args = ["--config", TINY, f"{stage}.max_steps=3", f"{stage}.batch_size=4"]
    args += ["rm.best_of_prompts=0", "rm.policy_samples=2", "dpo.kl_prompts=4"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"x{n}"
        cmd = torchrun_stage(stage, args, n, tiny_run, out)
        weights = load_tensors(out / stage / f"{RESUMABLE[stage][1]}.safetensors")
        runs[n] = (losses(out / stage), summary(out, stage), weights)
    (one, first, a), (two, second, b) = runs[1], runs[2]
    # every rank scores its half of each batch, and the step is the whole batch's
    assert len(one) == 3 and one == pytest.approx(two, abs=1e-5)
    assert first["device"] == "cpu x 1" and second["device"] == "cpu x 2"
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    start = load_tensors(tiny_run / "sft" / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and they did train
    # a batch smaller than the number of processes would leave one without items
    proc = subprocess.run(
        [*cmd, f"{stage}.batch_size=1"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode != 0 and "leaves some of the 2 processes without" in proc.stderr
