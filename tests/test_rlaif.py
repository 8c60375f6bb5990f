"""AI feedback: the judge's verdicts against a hand-computed forward pass, its position
debiasing, the model-backed reward sources in GRPO, and the `rlaif` stage on the tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from lmforge.config import load_config
from lmforge.data.preferences import read_pairs
from lmforge.judge import CONSTITUTION, SCORE_QUESTION, Judge, read_constitution
from lmforge.stages import grpo


@pytest.fixture(scope="module")
def judge(tokenizer, make_model):
    model = make_model(seed=3, vocab_size=tokenizer.vocab_size, max_seq_len=256)
    return Judge(model, tokenizer, "Be right. Be brief.", batch_size=2)


CONTEXTS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a river that runs through the old capital city."}],
    [{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}],
]
REPLIES = ["4", "The Timi, which is long.", "Hello there, how can I help you today?"]


def test_score_is_the_yes_odds_of_one_forward_pass(judge, tokenizer):
    got = judge.score(CONTEXTS, REPLIES)  # batches of 2, of different lengths
    assert got.shape == (3,) and ((got > 0) & (got < 1)).all()
    for i in range(3):
        question = SCORE_QUESTION.format(question=CONTEXTS[i][-1]["content"], answer=REPLIES[i])
        messages = [
            {"role": "system", "content": "Be right. Be brief."},
            {"role": "user", "content": question},
        ]
        ids = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        with torch.no_grad():
            logits = judge.model(torch.tensor([ids]))[0, -1]
        yes, no = tokenizer.encode("Yes")[0], tokenizer.encode("No")[0]
        want = torch.softmax(logits[[yes, no]], -1)[0]
        assert got[i].item() == pytest.approx(want.item(), abs=1e-5)  # padding changes nothing


def test_prefer_is_debiased_for_position_and_antisymmetric(judge):
    a, b = REPLIES, ["5", "I cannot help with that.", "Bye."]
    ab, ba = judge.prefer(CONTEXTS, a, b), judge.prefer(CONTEXTS, b, a)
    assert torch.allclose(ab["p_a"], (ab["p_a_first"] + ab["p_a_second"]) / 2)
    # asking (b, a) swaps the two orders: P(a better) + P(b better) = 1 exactly
    assert torch.allclose(ab["p_a"] + ba["p_a"], torch.ones(3), atol=1e-6)
    assert torch.allclose(ab["p_a_first"], 1 - ba["p_a_second"], atol=1e-6)


def test_constitution_file_and_its_errors(tmp_path):
    assert read_constitution(None) == CONSTITUTION
    path = tmp_path / "principles.txt"
    path.write_text("  Be kind.\n")
    assert read_constitution(path) == "Be kind."
    path.write_text("\n")
    with pytest.raises(ValueError, match="principles.txt: the constitution is empty"):
        read_constitution(path)


def test_grpo_with_judge_and_reward_model_rewards(tiny_run):
    overrides = [
        "grpo.steps=2",
        "grpo.eval_prompts=8",
        "grpo.max_new_tokens=16",
        "grpo.judge=policy",  # self-rewarding: the policy judges its own replies
        "grpo.rewards={verifiable=1.0, judge=0.5, rm=0.2, safety_helpfulness=0.3}",
    ]
    s = grpo.run(load_config(Path(TINY), overrides), tiny_run, stage="grpo_judged")
    log = [json.loads(x) for x in (tiny_run / "grpo_judged" / "metrics.jsonl").open()]
    rewards = [r["reward"] for r in log if "reward" in r]
    assert s["steps"] == 2 and len(rewards) == 2
    # the judge's and the reward model's terms make rewards that are not just 0/1 verifiable
    assert any(r not in (0.0, 1.0) for r in rewards)


def test_unknown_reward_source_fails_before_work(tiny_run):
    with pytest.raises(Exception, match="rewards"):
        load_config(Path(TINY), ["grpo.rewards={vibes=1.0}"])


def test_rlaif_stage_labels_pairs_with_the_judge_and_trains_dpo(tiny_run):
    overrides = ["rlaif.prompts=24", "rlaif.max_new_tokens=24", "dpo.kl_prompts=8"]
    from lmforge.stages import rlaif

    s = rlaif.run(load_config(Path(TINY), overrides), tiny_run)
    assert s["pairs_judged"] == 24 and 0 < s["pairs_kept"] <= 24
    assert s["self_rewarding"] is True and s["judge"] == str(tiny_run / "sft")
    assert 0.0 <= s["position_consistency"] <= 1.0
    assert s["judge_gold_agreement"] is None or 0.0 <= s["judge_gold_agreement"] <= 1.0
    pairs, report = read_pairs(tiny_run / "rlaif" / "pairs.jsonl")
    assert len(pairs) == s["pairs_kept"] and report["dropped_identical"] == 0
    trained = json.loads((tiny_run / "rlaif" / "dpo" / "summary.json").read_text())
    assert trained["pairs"] == s["pairs_kept"] and s["dpo_kl_to_ref"] == trained["kl_to_ref"]
    assert s["dpo_win_rate_vs_sft"] == trained["win_rate_vs_sft"]


def test_ppo_optimises_a_weighted_mix_of_sources(tiny_run):
    from lmforge.stages import ppo

    overrides = [
        "ppo.steps=2",
        "ppo.prompts_per_step=8",
        "ppo.eval_prompts=4",
        "ppo.kl_prompts=2",
        "ppo.rewards={rm=1.0, judge=0.5, length=0.1}",
    ]
    s = ppo.run(load_config(Path(TINY), overrides), tiny_run, stage="ppo_mixed")
    log = [json.loads(x) for x in (tiny_run / "ppo_mixed" / "metrics.jsonl").open()]
    assert s["steps"] == 2 and [r["step"] for r in log if "score" in r] == [1, 2]
    config = (tiny_run / "ppo_mixed" / "config.toml").read_text()
    assert 'judge" = 0.5' in config  # the mix is recorded with the run
