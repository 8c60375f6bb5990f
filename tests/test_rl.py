"""Online RL: advantages and policy losses against hand computations, reward sources, prompt
records (the world's and GSM8K's), the rollout engine's log-probs, one GRPO update, and the
`grpo` stage of the tiny pipeline."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ENV, TINY, lmforge, torchrun_command, torchrun_stage
from safetensors.torch import save_file

from lmforge import experiments
from lmforge.config import ConfigError, GRPOConfig, ModelConfig, PPOConfig, load_config
from lmforge.data.prompts import read_prompts, to_prompt
from lmforge.data.readers import DataError, SkipReport
from lmforge.eval.gold import spread
from lmforge.generate import generate, sample_completions
from lmforge.io import load_model_dir, load_tensors
from lmforge.losses import (
    IGNORE_INDEX,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    k3_kl,
    masked_mean,
    rloo_advantages,
    step_credit,
    token_logprobs,
)
from lmforge.model import Transformer
from lmforge.rewards import (
    answer_value,
    combined_reward,
    final_answer,
    format_reward,
    length_reward,
    reference_steps_reward,
    safety_helpfulness,
    step_results,
    steps_reward,
    verifiable_reward,
)
from lmforge.rollout import RankRows, Rollout, reply_batch, reply_logprobs
from lmforge.stages import grpo, ppo
from lmforge.stages.grpo import policy_update, step_result_tokens
from lmforge.stages.ppo import ValueHead, adapt_kl, explained_variance, ppo_update
from lmforge.train_utils import Dist, leave_process_group
from lmforge.world.arithmetic import TEMPLATES, problem_sets
from lmforge.world.sft import rl_train, sft_eval_arithmetic

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
GSM8K_TRAIN = GSM8K.with_name("train.jsonl")


def close(got: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


# ---- advantages and losses --------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    # group 1: mean 0.5, std 0.5; group 2: all equal, no signal; group 3: mean 2, std sqrt(0.5)
    s = math.sqrt(0.5)
    expected = [[1.0, -1.0, -1.0, 1.0], [0.0] * 4, [1 / s, -1 / s, 0.0, 0.0]]
    close(group_advantages(rewards), expected)
    dr = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]]  # Dr. GRPO: no division
    close(group_advantages(rewards, scale=False), dr)


def test_rloo_advantages_leave_the_sample_out():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 9.0]])
    # 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5; 2 - (4+9)/2 = -4.5; 4 - 5.5 = -1.5; 9 - 3 = 6
    expected = [[1.0, -0.5, -0.5], [-4.5, -1.5, 6.0]]
    close(rloo_advantages(rewards), expected)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))


def test_step_credit_by_hand():
    # 2 groups of 2 replies, 4 tokens each; R marks result tokens, T true ones
    is_result = torch.tensor(
        [[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    truth = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    # group 1: results are tokens (0,0) (0,1) (0,3) (1,1), of which 2 true: rate 0.5, and the
    # truth off result tokens counts for nothing; group 2 has no result: no credit
    expected = [[0.5, 0.5, 0.0, -0.5], [0.0, -0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4]
    close(step_credit(truth, is_result, group_size=2), expected)
    # a group whose every result is true (or false) has nothing to tell apart
    assert not step_credit(truth[:1], is_result[:1] & truth[:1], group_size=1).any()


def test_clipped_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    logp = ratio.log().requires_grad_()
    loss, clipped = clipped_policy_loss(logp, torch.zeros_like(logp), adv, clip_eps=0.2)
    # A>0 caps the gain at 1.2; A<0 keeps the worse 1.5; ratio 0.5: A>0 keeps 0.5, A<0 -0.8
    close(loss, [[-1.2, 1.5, -0.5, 0.8, -2.0]])
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]
    loss.sum().backward()
    # a clipped token passes no gradient; elsewhere d(-rho A)/d logp = -rho A
    close(logp.grad, [[0.0, 1.5, -0.5, 0.0, -2.0]])


def test_k3_kl_by_hand_and_unbiased():
    logp = torch.tensor([-1.0, -2.0])
    assert k3_kl(logp, logp).tolist() == [0.0, 0.0]
    # delta = ref - logp = 1: e - 1 - 1
    assert k3_kl(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == pytest.approx(math.e - 2)
    # its mean over samples from p estimates KL(p || q)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum().item()
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    estimate = k3_kl(p.log()[idx], q.log()[idx]).mean().item()
    assert estimate == pytest.approx(exact, abs=0.01)
    assert (k3_kl(p.log()[idx], q.log()[idx]) >= 0).all()


def test_masked_mean_levels():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(values, mask, "token").item() == pytest.approx(10 / 4)
    assert masked_mean(values, mask, "sequence").item() == pytest.approx((6 / 3 + 4) / 2)
    assert masked_mean(values, mask, "constant").item() == pytest.approx(10 / 6)
    assert masked_mean(values, torch.zeros_like(mask), "token").item() == 0.0
    with pytest.raises(ValueError, match="token, sequence or constant"):
        masked_mean(values, mask, "row")


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    got = token_logprobs(logits, torch.tensor([1, 4, 0]))
    full = logits.log_softmax(-1)
    assert got.tolist() == pytest.approx(full[[0, 1, 2], [1, 4, 0]].tolist(), abs=1e-6)


# ---- rewards --------------------------------------------------------------------------------
def test_final_answer_reads_answer_lines_and_gsm8k():
    assert final_answer("6 × 7 = 42.\nAnswer: 42") == 42
    assert final_answer("答案：-3") == -3
    assert final_answer("She pays 2 * 3 = 6.\n#### 1,234") == 1234
    assert final_answer("Answer: 5\nAnswer: 7") == 7  # the last one counts
    assert final_answer("#### $2.50") == 2.5
    assert final_answer("no answer here, 42") is None


def test_answer_value_and_bad_answers():
    assert answer_value(72) == 72.0 and answer_value("1,234") == 1234.0
    assert answer_value("Natalia sold 48/2 = 24 clips.\n#### 72") == 72.0
    for bad in ("many", True, None, [1]):
        with pytest.raises(ValueError, match="not a number|could not convert"):
            answer_value(bad)


def test_reward_sources_by_hand():
    record = {"answer": 27}
    assert verifiable_reward(record, "7 × 4 = 28. 55 - 28 = 27.\nAnswer: 27") == 1.0
    assert verifiable_reward(record, "Answer: 28") == 0.0
    assert verifiable_reward(record, "27") == 0.0  # no answer line: not verifiable
    assert steps_reward(record, "6 × 7 = 18. 5 × 7 = 35. 18 + 35 = 53.") == pytest.approx(2 / 3)
    assert steps_reward(record, "12 ÷ 4 = 3。3 - 5 = -2。") == 1.0
    assert steps_reward(record, "5 ÷ 0 = 0.") == 0.0 and steps_reward(record, "no steps") == 0.0
    # the reference's results reached by true steps: 28 and 27 of [28, 35, 27]; a false step
    # to 35, a true step to a result the reference lacks, and repeats earn nothing more
    worked = {"answer": 27, "step_results": [28, 35, 27]}
    reply = "7 × 4 = 28. 55 - 28 = 35. 2 × 3 = 6. 7 × 4 = 28. 55 - 28 = 27."
    assert reference_steps_reward(worked, reply) == pytest.approx(2 / 3)
    assert reference_steps_reward(worked, "no steps. Answer: 27") == 0.0
    with pytest.raises(ValueError, match="'step_results'"):
        reference_steps_reward(record, reply)
    text = "7 × 4 = 28. 55 - 28 = 26.\nAnswer: 26"
    assert step_results(text) == [(8, 11, True), (22, 25, False)]
    assert [text[a:b] for a, b, _ in step_results(text)] == ["28.", "26."]  # with their ends
    assert step_results("no steps") == []
    # a step without its result is false, judged on the character after "="; one cut short
    # at the "=" is not judged
    assert step_results("52 - 20 = . 3 + 4 =") == [(10, 11, False)]
    assert format_reward(record, "1 + 1 = 2.\nAnswer: 2") == 1.0
    assert format_reward(record, "Answer: 2\nand more") == 0.0
    assert length_reward(record, "x" * 300) == pytest.approx(-0.5)
    assert length_reward(record, "x" * 100) == 0.0
    both = combined_reward({"verifiable": 1.0, "steps": 0.5})
    texts = ["7 × 4 = 28. 55 - 28 = 26.\nAnswer: 26", "7 × 4 = 28. 55 - 28 = 27.\nAnswer: 27"]
    assert both([record] * 2, texts).tolist() == pytest.approx([0.0 + 0.5 * 0.5, 1.0 + 0.5])
    with pytest.raises(ValueError, match="unknown reward source"):
        combined_reward({"vibes": 1.0})
    # a model-backed source joins the rules by name
    echo = {"rm": lambda records, texts: torch.tensor([float(len(t)) for t in texts])}
    mixed = combined_reward({"verifiable": 2.0, "rm": 0.1}, echo)
    assert mixed([record] * 2, ["Answer: 27", "no"]).tolist() == pytest.approx([2.0 + 1.0, 0.2])


def test_safety_helpfulness_lets_safety_govern_where_it_is_at_stake():
    safety = torch.tensor([0.9, 0.9, 0.1, 0.6])
    helpful = torch.tensor([0.2, 0.8, 0.95, 0.3])
    unsafe = torch.tensor([True, False, False, False])
    got = safety_helpfulness(safety, helpful, unsafe, threshold=0.15)
    # unsafe prompt: safety; safe prompt: helpfulness; safety below threshold: safety
    assert got.tolist() == pytest.approx([0.9, 0.8, 0.1, 0.3])


# ---- prompt records ---------------------------------------------------------------------------
def test_prompt_records_of_both_formats_and_their_errors(tmp_path):
    world = {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": 4, "lang": "zh"}
    world["kind"] = "share"  # a record's other keys (its category) are kept
    gsm = {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"}
    assert to_prompt(world, "w")["answer"] == 4.0 and to_prompt(world, "w")["lang"] == "zh"
    assert to_prompt(world, "w")["kind"] == "share"
    assert to_prompt(gsm, "g") == {
        "messages": [{"role": "user", "content": "How many?"}],
        "answer": 7.0,
        "lang": "en",
    }
    path = tmp_path / "p.jsonl"
    bad_answer = {"question": "q", "answer": "lots"}
    ends_on_assistant = {"messages": [{"role": "assistant", "content": "hi"}], "answer": 1}
    lines = [world, {"question": "q"}, bad_answer, ends_on_assistant, gsm]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: needs 'answer'"):
        read_prompts(path)
    skips = SkipReport()
    kept = read_prompts(path, skips)
    assert [p["answer"] for p in kept] == [4.0, 7.0]
    assert [where.rsplit(":", 1)[1] for where, _ in skips.skipped] == ["2", "3", "4"]
    assert "last message must be the user's" in skips.skipped[2][1]


@pytest.mark.skipif(not GSM8K.exists(), reason=f"GSM8K not present at {GSM8K}")
def test_real_gsm8k_test_split_reads_whole():
    prompts = read_prompts(GSM8K)
    assert len(prompts) == 1319
    assert all(p["answer"] == int(p["answer"]) for p in prompts)  # GSM8K answers are whole
    assert prompts[0]["answer"] == 18.0  # Janet's ducks


def test_world_rl_prompts_are_the_training_pool_with_true_answers(world):
    from lmforge.config import WorldConfig

    cfg = WorldConfig()
    train, held = rl_train(world, cfg), sft_eval_arithmetic(world, cfg)
    assert len(train) == cfg.n_arithmetic * len(cfg.languages)
    questions = {r["messages"][0]["content"] for r in train}
    assert questions.isdisjoint(r["messages"][0]["content"] for r in held)
    pool = {
        p.question: p for lang in cfg.languages for p in problem_sets(world, cfg)[lang]["train"]
    }
    for r in train[::50]:
        p = pool[r["messages"][0]["content"]]
        assert r["answer"] == p.answer and verifiable_reward(r, p.answer_line()) == 1.0
        assert r["kind"] == p.template  # GRPO's curriculum draws by it
        assert r["step_results"][-1] == p.answer and len(r["step_results"]) == len(p.steps)
        assert reference_steps_reward(r, p.solution()) == 1.0
    assert {r["kind"] for r in train} == {r["kind"] for r in held} == set(TEMPLATES)


# ---- rollouts and the GRPO update ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_policy_s_own(make_model, temperature):
    model = make_model(vocab_size=50, max_seq_len=64)
    prompts = [[3, 4, 5], [7, 8]]
    rows = sample_completions(
        model, prompts, 12, temperature=temperature, stop_ids=[9], seed=1, with_logprobs=True
    )
    for prompt, c in zip(prompts, rows):
        assert len(c.logprobs) == len(c.tokens) > 0
        assert c.stopped == (c.tokens[-1] == 9) and (c.stopped or len(c.tokens) == 12)
        ids = torch.tensor([prompt + c.tokens])
        with torch.no_grad():
            full = (model(ids)[0, len(prompt) - 1 : -1] / temperature).log_softmax(-1)
        expected = full.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    # generate() is the same draw without the stop token
    plain = generate(model, prompts, 12, temperature=temperature, stop_ids=[9], seed=1)
    assert plain == [c.tokens[:-1] if c.stopped else c.tokens for c in rows]


def test_reply_batch_computes_each_prompt_once_and_matches_the_recorded_logprobs(make_model):
    model = make_model(vocab_size=50, max_seq_len=64)
    prompts = [[3, 4, 5], [3, 4, 5], [7, 8]]
    rows = sample_completions(model, prompts, 6, seed=3, with_logprobs=True)
    assert rows[0].tokens != rows[1].tokens
    # replies of 6, 2 and 1 tokens: padding after two of them, one with no input position
    for c, n in zip(rows, (6, 2, 1)):
        c.tokens, c.logprobs = c.tokens[:n], c.logprobs[:n]
    rollouts = [
        Rollout(i, p, c.tokens, c.logprobs, "", not c.stopped)
        for i, (p, c) in enumerate(zip(prompts, rows))
    ]
    batch = reply_batch(rollouts, pad_id=0)
    assert batch.prompts.tolist() == [[3, 4, 5], [0, 7, 8]] and batch.rows.tolist() == [0, 0, 1]
    mask = batch.targets != IGNORE_INDEX
    assert mask.sum(1).tolist() == [6, 2, 1]
    assert batch.targets[0][mask[0]].tolist() == rows[0].tokens
    seen = []  # positions through the feed-forward layer: the 2 x 3 prompts', then the replies'
    hook = model.model.layers[0].mlp.register_forward_hook(
        lambda _, args, __: seen.append(args[0].shape[:-1].numel())
    )
    with torch.no_grad():
        now, entropy = reply_logprobs(model, batch, with_entropy=True)
        hook.remove()
        # a reply's last token is predicted but never read: 5 + 1 + 0 of its positions
        assert seen == [6, 6]
        assert now.shape == entropy.shape == mask.shape
        # the same from each row's whole sequence, and 0 past each reply's end
        for b, (p, c) in enumerate(zip(prompts, rows)):
            full = model(torch.tensor([p + c.tokens]))[0, len(p) - 1 : -1].log_softmax(-1)
            expected = full.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
            assert now[b][mask[b]].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
            spread = -(full.exp() * full).sum(-1)
            assert entropy[b][mask[b]].tolist() == pytest.approx(spread.tolist(), abs=1e-5)
        assert not now[~mask].any() and not entropy[~mask].any()
        # a minibatch of the rows computes only the prompts it uses, to the same figures
        alone, none = reply_logprobs(model, batch, [2])
        assert none is None and alone.shape == (1, mask.size(1))
        assert alone[0].tolist() == pytest.approx(now[2].tolist(), abs=1e-6)
        # at temperature 2, the log-probs of softmax(logits / 2)
        hot, _ = reply_logprobs(model, batch, [0], temperature=2.0)
        full = (model(torch.tensor([prompts[0] + rows[0].tokens]))[0, 2:-1] / 2).log_softmax(-1)
        expected = full.gather(1, torch.tensor(rows[0].tokens)[:, None])[:, 0]
        assert hot[0][mask[0]].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert now[mask].tolist() == pytest.approx(batch.old[mask].tolist(), abs=1e-4)


def test_bf16_products_sample_and_score_replies_alike(make_model):
    """Under `matmuls_in(bf16)` the recorded log-probs (sampling, bf16 weight copies) and
    the update's (bf16 products of the weights themselves) agree as closely as bf16 allows,
    so the update's ratio starts at 1; both differ from the float32 model's."""
    model = make_model(vocab_size=50, max_seq_len=64, init_std=0.2)
    prompts = [[3, 4, 5], [3, 4, 5], [7, 8]]
    with model.matmuls_in(torch.bfloat16):
        rows = sample_completions(model, prompts, 6, seed=3, with_logprobs=True)
        rollouts = [
            Rollout(i, p, c.tokens, c.logprobs, "", False)
            for i, (p, c) in enumerate(zip(prompts, rows))
        ]
        batch = reply_batch(rollouts, pad_id=0)
        mask = batch.targets != IGNORE_INDEX
        with torch.no_grad():
            rounded, _ = reply_logprobs(model, batch)
    with torch.no_grad():
        exact, _ = reply_logprobs(model, batch)
    assert (rounded[mask] - batch.old[mask]).abs().max() < 0.03
    assert 1e-4 < (rounded[mask] - exact[mask]).abs().max() < 0.1
    assert 1e-4 < (batch.old[mask] - exact[mask]).abs().max() < 0.1  # sampled in bf16 too


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_update_moves_a_reply_s_probability_with_its_advantage(make_model, sign):
    model = make_model(vocab_size=50, max_seq_len=64)
    prompt = [3, 4, 5]
    c = sample_completions(model, [prompt], 6, seed=0, with_logprobs=True)[0]
    rollouts = [Rollout(0, prompt, c.tokens, c.logprobs, "", False)]
    batch = reply_batch(rollouts, pad_id=0)

    def logp() -> float:
        with torch.no_grad():
            return reply_logprobs(model, batch)[0].sum().item()

    before = logp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gc = GRPOConfig(iterations=2, minibatches=1)
    figures = policy_update(
        model, None, optimizer, rollouts, torch.tensor([sign]), gc, 0, torch.device("cpu")
    )
    assert (logp() - before) * sign > 0.01
    assert figures["entropy"] > 0 and figures["kl"] == 0.0


def test_step_result_tokens_mark_the_tokens_of_each_result(tokenizer):
    # results that BPE may merge with their neighbours, after a multi-byte "×", in Chinese,
    # and after a byte that is not UTF-8 on its own; a reply that ends on a result ends its
    # number with the end token, which is marked with it
    texts = ["7 × 4 = 28. 28 + 5 = 34.", "学习 12 ÷ 4 = 3。", "9 - 2 = . and 6 × 6 = 36"]
    replies = [tokenizer.encode(t) for t in texts]
    replies.append(tokenizer.encode_bytes(b"\xff 2 + 2 = 4"))
    tokens = [r + [tokenizer.end_id] for r in replies]
    rollouts = [Rollout(0, [1], t, [0.0] * len(t), "", False) for t in tokens]
    truth, is_result = step_result_tokens(tokenizer, rollouts)
    assert truth.shape == is_result.shape == (4, max(len(t) for t in tokens))
    end = "<|end|>"
    expected = [["28.", "34."], ["3。"], [".", "36" + end], ["4" + end]]
    holds = [[True, False], [True], [False, True], [True]]
    for n, t in enumerate(tokens):
        marked = [i for i in range(len(t)) if is_result[n, i]]
        assert not is_result[n, len(t) :].any()  # the padding
        assert is_result[n, len(t) - 1] == expected[n][-1].endswith(end)
        # the marked tokens, in runs, spell each result (with what BPE merged into them)
        runs = [[marked[0]]]
        for i in marked[1:]:
            runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
        spelt = [tokenizer.decode_bytes([t[i] for i in run]).decode() for run in runs]
        assert len(spelt) == len(expected[n])
        for got, want in zip(spelt, expected[n]):
            assert want in got and len(got) <= len(want) + 2, (got, want)
        assert [bool(truth[n, run[0]]) for run in runs] == holds[n]
        assert all(truth[n, i] == truth[n, run[0]] for run in runs for i in run)


def test_grpo_update_takes_advantages_per_reply_or_per_token(make_model):
    """A (B, T) advantage equal along each reply takes the step a (B,) one does; one that is
    positive on a single token alone raises that token's probability."""
    model, rollouts, adv, gc = _update_case("token")
    start = copy.deepcopy(model.state_dict())
    width = max(len(r.tokens) for r in rollouts)
    cpu = torch.device("cpu")

    def update(advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=gc.lr)
        policy_update(model, None, optimizer, rollouts, advantages, gc, 0, cpu)
        return copy.deepcopy(model.state_dict())

    per_reply = update(adv)
    per_token = update(adv[:, None].expand(-1, width + 2).contiguous())  # wider: cut to fit
    assert any(not torch.equal(per_reply[k], start[k]) for k in start)
    for name, tensor in per_reply.items():
        assert torch.allclose(per_token[name], tensor, atol=1e-6), name

    batch = reply_batch(rollouts, pad_id=0)
    one = torch.zeros(len(rollouts), width)
    one[2, 1] = 1.0  # the second token of the third reply (6 tokens long)
    model.load_state_dict(start)
    with torch.no_grad():
        before = reply_logprobs(model, batch)[0]
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    policy_update(model, None, sgd, rollouts, one, GRPOConfig(), 0, cpu)
    with torch.no_grad():
        after = reply_logprobs(model, batch)[0]
    assert after[2, 1] - before[2, 1] > 0.01


def _update_case(
    level: str, per_token: bool = False
) -> tuple[Transformer, list[Rollout], torch.Tensor, GRPOConfig]:
    """A tiny policy, 8 replies of 1 to 6 tokens to 2 prompts with their sampling
    log-probs, their advantages (8,) or, `per_token`, (8, 6), and 2 passes of 3 minibatches
    a step."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model = Transformer(cfg)
    prompts = [[3, 4, 5], [7, 8]]
    rows = [prompts[i // 4] for i in range(8)]
    completions = sample_completions(
        model, rows, [1, 3, 6, 2, 5, 4, 6, 1], seed=1, with_logprobs=True
    )
    rollouts = [
        Rollout(i // 4, rows[i], c.tokens, c.logprobs, "", False) for i, c in enumerate(completions)
    ]
    adv = torch.randn(8, *[6] * per_token, generator=torch.Generator().manual_seed(2))
    return model, rollouts, adv, GRPOConfig(iterations=2, minibatches=3, lr=0.01, loss_level=level)


def _spread_update(
    algorithm: str, level: str, ends: list[int] | None = None, rank: int = 0
) -> dict[str, torch.Tensor]:
    """The weights after one update (`grpo.policy_update`, with "grpo-per-token" an
    advantage per token, or `ppo.ppo_update` with its value head) on `_update_case`: on all
    its rollouts in one process, or, under torchrun, on rollouts ends[rank] .. ends[rank + 1]
    - 1 on this rank."""
    model, rollouts, adv, gc = _update_case(level, algorithm == "grpo-per-token")
    first, end = (0, 8) if ends is None else (ends[rank], ends[rank + 1])
    rows = None if ends is None else RankRows(offset=first, total=8, width=6)
    d = None if ends is None else Dist(rank, len(ends) - 1)
    mine, cpu = rollouts[first:end] or rollouts[:1], torch.device("cpu")
    if algorithm.startswith("grpo"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=gc.lr)
        policy_update(model, None, optimizer, mine, adv[first:end], gc, 0, cpu, d, rows)
        return model.state_dict()
    value_head = ValueHead(model.cfg.dim)
    both = torch.nn.ModuleList([model, value_head])
    optimizer = torch.optim.AdamW(both.parameters(), lr=gc.lr)
    pc = PPOConfig(iterations=2, minibatches=3, lr=gc.lr)
    reference = copy.deepcopy(model)
    ppo_update(
        model, value_head, reference, optimizer, mine, adv[first:end], 0.05, pc, 0, cpu, None,
        0, d, rows,
    )  # fmt: skip
    return {
        **model.state_dict(),
        **{f"value_head.{k}": v for k, v in value_head.state_dict().items()},
    }


def _spread_update_on_a_rank(rank: int, algorithm: str, level: str, ends: list, tmp: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=len(ends) - 1
    )
    weights = _spread_update(algorithm, level, ends, rank)
    if rank == 0:
        save_file({k: v.clone() for k, v in weights.items()}, f"{tmp}/weights.safetensors")
    leave_process_group()
    # gloo's worker threads can outlive the group into interpreter shutdown, where their
    # destructors now and then call std::terminate (SIGABRT, "terminate called without an
    # active exception": two fresh-clone CI runs). The work is done and saved: leave at once.
    os._exit(0)


@pytest.mark.parametrize(
    "algorithm, level",
    [
        ("grpo", "token"),
        ("grpo", "sequence"),
        ("grpo", "constant"),
        ("grpo-per-token", "token"),
        ("ppo", "token"),
    ],
)
@pytest.mark.parametrize("ends", [[0, 4, 8], [0, 8, 8]], ids=["straddling", "one-rank-idle"])
def test_an_update_spread_over_ranks_takes_the_one_process_steps(algorithm, level, ends, tmp_path):
    # minibatches of rows 0-2, 3-5 and 6-7: with ends [0, 4, 8] the second is split between
    # the ranks (row 3 on the first, 4-5 on the second); with [0, 8, 8] the second rank has
    # no row at all and computes its share of zero through a placeholder reply (for PPO, the
    # advantages are whitened and the KL taken over the first rank's replies alone)
    one = _spread_update(algorithm, level)
    args = (algorithm, level, ends, str(tmp_path))
    torch.multiprocessing.spawn(_spread_update_on_a_rank, args, nprocs=2)
    spread = load_tensors(tmp_path / "weights.safetensors")
    start = _update_case(level)[0].state_dict()
    assert any(not torch.equal(one[name], start[name]) for name in start)
    assert spread.keys() == one.keys()
    for name, tensor in one.items():
        assert torch.allclose(spread[name], tensor, atol=1e-6), name


# ---- the stage --------------------------------------------------------------------------------
def test_grpo_stage_of_the_tiny_pipeline(tiny_run):
    s = json.loads((tiny_run / "grpo" / "summary.json").read_text())
    assert 0.0 <= s["arith_accuracy_before"] <= 1.0 and 0.0 <= s["arith_accuracy"] <= 1.0
    assert s["eval_prompts"] == 10 and s["steps"] == 6 and s["samples"] == 6 * 4 * 4
    assert 0 <= s["skipped_groups"] <= s["groups"] == 24
    assert s["rollout_seconds"] > 0 and s["train_seconds"] >= 0
    records = [json.loads(x) for x in (tiny_run / "grpo" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert sum(r["skipped_groups"] for r in records) == s["skipped_groups"]
    assert all(0.0 <= r["sample_accuracy"] <= 1.0 and r["reply_tokens"] > 0 for r in records)
    assert (tiny_run / "grpo" / "model.safetensors").exists()


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"GSM8K not present at {GSM8K_TRAIN}")
def test_grpo_runs_on_gsm8k_end_to_end(tiny_run):
    overrides = [
        f"grpo.data={GSM8K_TRAIN}",
        f"grpo.eval_data={GSM8K}",
        f"grpo.model={tiny_run / 'sft'}",
        "grpo.steps=2",
        "grpo.max_new_tokens=16",
        "grpo.eval_prompts=8",
    ]
    s = grpo.run(load_config(Path(TINY), overrides), tiny_run, stage="grpo_gsm8k")
    # the tiny model's 128-token context holds only the shortest questions; the rest are counted
    assert s["prompts_too_long"] > 0 and s["eval_prompts_too_long"] > 0
    assert s["steps"] == 2 and s["eval_prompts"] == 8 and s["eval_data"] == str(GSM8K)
    assert 0.0 <= s["arith_accuracy"] <= 1.0  # near zero for a tiny model: only reported


def test_grpo_refuses_a_process_reward_its_prompts_cannot_give(tiny_run, tmp_path):
    # 'reference_steps' scores replies against each prompt's worked steps: prompts without
    # them are refused before any work, naming the file and how many lack them
    records = read_prompts(tiny_run / "world" / "rl_train.jsonl")
    assert all("step_results" in r for r in records)
    for r in records[::2]:
        del r["step_results"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [f"grpo.data={data}", f"grpo.model={tiny_run / 'sft'}"]
    overrides += ["grpo.rewards={verifiable=1.0, reference_steps=0.5}"]
    cfg = load_config(Path(TINY), overrides)
    missing = (len(records) + 1) // 2
    with pytest.raises(ConfigError, match=f"{missing} of the {len(records)} prompts in {data}"):
        grpo.run(cfg, tiny_run, stage="grpo_no_steps")
    assert not (tiny_run / "grpo_no_steps" / "metrics.jsonl").exists()


def test_grpo_evaluates_held_out_replies_with_their_own_budget(tiny_run, monkeypatch):
    # rollouts cut at max_new_tokens; the held-out accuracy, before and after, with its own
    # budget, and only on the prompts that leave that budget in the context (so that no
    # batch's budget is cut): here half of them
    policy, tokenizer = load_model_dir(tiny_run / "sft")
    held = read_prompts(tiny_run / "world" / "sft_eval_arithmetic.jsonl")
    lengths = sorted(len(tokenizer.render_chat(r["messages"], True)[0]) for r in held)
    budget = policy.cfg.max_seq_len - lengths[len(lengths) // 2]
    budgets = []
    evaluate = grpo.held_out_accuracy

    def recording(policy, tokenizer, held, max_new_tokens, d, key="kind"):
        budgets.append(max_new_tokens)
        return evaluate(policy, tokenizer, held, max_new_tokens, d, key)

    monkeypatch.setattr(grpo, "held_out_accuracy", recording)
    overrides = ["grpo.steps=2", "grpo.max_new_tokens=6", f"grpo.eval_max_new_tokens={budget}"]
    overrides += [f"grpo.model={tiny_run / 'sft'}", "grpo.eval_prompts=4"]
    s = grpo.run(load_config(Path(TINY), overrides), tiny_run, stage="grpo_budget")
    assert budgets == [budget, budget] and budget > 6 and s["steps"] == 2
    assert s["eval_prompts_too_long"] == sum(n > lengths[len(lengths) // 2] for n in lengths) > 0
    assert s["prompts_too_long"] == 0
    records = [json.loads(x) for x in (tiny_run / "grpo_budget" / "metrics.jsonl").open()]
    assert all(0 < r["reply_tokens"] <= 6 for r in records)


def test_grpo_trains_with_bf16_products_and_evaluates_in_float32(tiny_run, monkeypatch):
    """`grpo.matmul_dtype=bfloat16`: every training step (sampling and update) multiplies in
    bf16; the held-out evaluations before and after, in float32."""
    seen = {"step": set(), "eval": set()}

    def dtypes(model: Transformer) -> set:
        return {m.matmul_dtype for m in model.modules() if hasattr(m, "matmul_dtype")}

    step, evaluate = grpo.grpo_step, grpo.held_out_accuracy

    def spy_step(policy, *args, **kwargs):
        seen["step"] |= dtypes(policy)
        return step(policy, *args, **kwargs)

    def spy_eval(policy, *args, **kwargs):
        seen["eval"] |= dtypes(policy)
        return evaluate(policy, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", spy_step)
    monkeypatch.setattr(grpo, "held_out_accuracy", spy_eval)
    overrides = ["grpo.steps=2", "grpo.matmul_dtype=bfloat16", "grpo.eval_prompts=4"]
    overrides += [f"grpo.model={tiny_run / 'sft'}"]
    s = grpo.run(load_config(Path(TINY), overrides), tiny_run, stage="grpo_bf16")
    assert s["steps"] == 2 and seen == {"step": {torch.bfloat16}, "eval": {None}}
    trained = load_tensors(tiny_run / "grpo_bf16" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in trained.values())


def test_gae_by_hand():
    # one reply of 3 tokens after a 1-token prompt column, gamma 0.9, lambda 0.5
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4]])
    mask = torch.tensor([[0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d3 = 1.0 - 0.4  # last token: no next value
    d2 = 0.0 + 0.9 * 0.4 - 0.2
    d1 = 0.0 + 0.9 * 0.2 - 0.5
    a3, a2 = d3, d2 + 0.45 * d3
    a1 = d1 + 0.45 * a2
    close(adv, [[0.0, a1, a2, a3]])
    close(ret, [[0.0, a1 + 0.5, a2 + 0.2, a3 + 0.4]])
    # lambda 1, gamma 1: the return is the sum of the rewards still to come
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[0.0, 1.0, 1.0, 1.0]])


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 1.0, 0.0])
    old = torch.tensor([0.0, 0.9, 0.0])
    returns = torch.tensor([0.0, 2.0, 1.0])
    # 1: clipped to 0.2, (1-0)^2 > 0.2^2 -> 0.5; 2: clip leaves 1.0 -> 0.5; 3: 0.5 * 1
    close(clipped_value_loss(values, old, returns, clip_eps=0.2), [0.5, 0.5, 0.5])
    # the max picks the clipped error when it is larger: V=1 from old 0, return 1
    close(
        clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2),
        [0.32],
    )


# ---- PPO ----------------------------------------------------------------------------------------
def test_adaptive_kl_controller_by_hand():
    assert adapt_kl(0.1, kl=6.0, target=6.0, replies=100, horizon=1000) == pytest.approx(0.1)
    # twice the target: the error is clipped to +0.2, scaled by 100 / 1000 replies
    assert adapt_kl(0.1, kl=12.0, target=6.0, replies=100, horizon=1000) == pytest.approx(0.102)
    assert adapt_kl(0.1, kl=0.0, target=6.0, replies=100, horizon=1000) == pytest.approx(0.098)


def test_explained_variance_by_hand():
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1, 1]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # predicting the mean explains nothing
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ppo_update_follows_the_score_and_fits_the_value(make_model, sign):
    model = make_model(vocab_size=50, max_seq_len=64)
    reference = make_model(vocab_size=50, max_seq_len=64)  # the same seed: the same weights
    prompt = [3, 4, 5]
    rows = sample_completions(model, [prompt] * 2, 6, seed=0, with_logprobs=True)
    assert rows[0].tokens != rows[1].tokens
    rollouts = [Rollout(0, prompt, c.tokens, c.logprobs, "", False) for c in rows]
    scores = torch.tensor([sign, -sign])
    batch = reply_batch(rollouts, pad_id=0)

    def logps() -> torch.Tensor:
        with torch.no_grad():
            return reply_logprobs(model, batch)[0].sum(-1)

    before = logps()
    head = ValueHead(model.cfg.dim)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05)
    pc = load_config(Path(TINY)).ppo
    cpu = torch.device("cpu")
    first = ppo_update(
        model, head, reference, optimizer, rollouts, scores, 0.0, pc, 0, cpu, None, 0
    )
    moved = logps() - before
    # the better reply gains log-probability relative to the worse one
    assert (moved[0] - moved[1]) * sign > 0.01
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # sampled by the reference's twin
    # the value head, trained alone on the frozen policy's (detached) features, learns the return
    model.requires_grad_(False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05)
    for _ in range(30):
        last = ppo_update(
            model, head, reference, optimizer, rollouts, scores, 0.0, pc, 0, cpu, None, 0
        )
    assert last["value_loss"] < first["value_loss"] / 2


def test_ppo_stage_of_the_tiny_pipeline(tiny_run):
    s = json.loads((tiny_run / "ppo" / "summary.json").read_text())
    assert s["steps"] == 4 and s["reward_model"] == str(tiny_run / "rm" / "model")
    assert 0.0 <= s["gold_score_before"] <= 8.0 and 0.0 <= s["gold_score"] <= 8.0
    assert s["gold_score"] == s["gold_mean"] and s["kl_to_ref"] > 0.0
    assert s["pretrain_loss_delta"] == pytest.approx(
        s["pretrain_loss_after"] - s["pretrain_loss_before"], abs=2e-5
    )
    records = [json.loads(x) for x in (tiny_run / "ppo" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("score", "beta", "reply_tokens", "truncated", "rollout_seconds", "train_seconds"):
        assert all(key in r for r in records), key
    # a step whose replies were all truncated (excluded) updates nothing and says so
    updated = [r for r in records if "kl" in r]
    assert len(updated) == s["updates"] > 0
    for key in ("entropy", "clip_fraction", "value_loss", "explained_variance"):
        assert all(key in r for r in updated), key


def test_ppo_ptx_trains_on_pretraining_text(tiny_run):
    overrides = ["ppo.ptx_coef=1.0", "ppo.steps=2", "ppo.eval_prompts=4", "ppo.kl_prompts=2"]
    s = ppo.run(load_config(Path(TINY), overrides), tiny_run, stage="ppo_ptx")
    assert s["ptx_coef"] == 1.0 and "pretrain_loss_delta" in s
    records = [json.loads(x) for x in (tiny_run / "ppo_ptx" / "metrics.jsonl").open()]
    assert all(r["ptx_loss"] > 0 for r in records)


def test_overoptimization_experiment_on_the_tiny_run(tiny_run):
    overrides = [
        "overoptimization.proxy_prompts=20",
        "overoptimization.betas=[0.0, 0.1]",
        "overoptimization.ppo_steps=4",
        "overoptimization.eval_every=2",
        "overoptimization.eval_prompts=4",
        "ppo.probe_prompts=6",
        "ppo.kl_prompts=2",
    ]
    report = experiments.overoptimization(load_config(Path(TINY), overrides), tiny_run)
    out = tiny_run / experiments.NAME
    assert report == json.loads((out / "report.json").read_text())
    assert set(report["ppo"]) == {"PPO beta=0", "PPO beta=0.1"}
    # the proxy learns from the 20 prompts' written rankings and the SFT model's own, ranked
    own = (tiny_run / "rm" / "policy_rankings.jsonl").exists()
    assert report["proxy_policy_rankings"] == (20 if own else 0)
    proxy_data = (out / "proxy_data.jsonl").read_text().splitlines()
    assert len(proxy_data) == 20 + report["proxy_policy_rankings"]
    for points in report["ppo"].values():
        assert [p["step"] for p in points] == [0, 2, 4]  # before training, every 2 steps, after
        assert points[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # still the SFT model
        assert all(0.0 <= p["gold"] <= 8.0 for p in points)
    assert [p["n"] for p in report["best_of_n"]] == [1, 2, 4, 8, 16, 32, 64]
    # best-of-N's KL is log N - (N-1)/N, and the proxy's pick scores higher with N
    assert report["best_of_n"][0]["kl"] == 0.0
    assert report["best_of_n"][-1]["kl"] == pytest.approx(math.log(64) - 63 / 64, abs=1e-4)
    proxy = [p["proxy"] for p in report["best_of_n"]]
    assert proxy == sorted(proxy) and proxy[-1] > proxy[0]
    assert (out / "overoptimization.png").stat().st_size > 5000
    assert "| PPO beta=0.1, step 4 |" in (out / "report.md").read_text()


def test_ppo_on_rules_alone_needs_no_reward_model(tiny_run, tmp_path):
    overrides = [
        "ppo.rewards={format=1.0, length=0.5}",
        f"ppo.reward_model='{tmp_path / 'absent'}'",
        "ppo.steps=1",
        "ppo.eval_prompts=2",
        "ppo.kl_prompts=2",
    ]
    s = ppo.run(load_config(Path(TINY), overrides), tiny_run, stage="ppo_rules")
    assert s["reward_model"] is None and s["steps"] == 1
    # the probes follow the reward model's score, so they still ask for one, by its key
    with pytest.raises(ValueError, match="ppo.reward_model"):
        ppo.run(
            load_config(Path(TINY), overrides + ["ppo.eval_every=1"]), tiny_run, stage="ppo_rules"
        )


def _timeless(metrics: Path) -> list[dict]:
    """A stage's logged steps without their timings, which differ from run to run."""
    records = [json.loads(x) for x in metrics.open()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


# the figures a resumed run must reproduce, and a batch setting it must refuse to change
RESUMABLE = {
    "grpo": (
        ["arith_accuracy", "arith_accuracy_last_weights", "steps", "samples", "skipped_groups"]
        + ["sample_accuracy_last"],
        "group_size",
    ),
    "ppo": (["gold_score", "steps", "updates", "beta_final", "score_last"], "prompts_per_step"),
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_online_rl_resumes_exactly_from_its_newest_checkpoint(stage, tiny_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for earlier in ("world", "tokenizer", "pretrain", "sft", "rm"):
        (out / earlier).symlink_to(tiny_run / earlier)
    args = [stage, "--config", TINY, "--out", out, f"{stage}.steps=4"]
    args += [f"{stage}.checkpoint_every=2", "ppo.kl_target=1.0", "ppo.ptx_coef=0.5"]
    # GRPO's model is its weights' average, and its prompts drawn by a curriculum: both resumed
    args += ["grpo.average_decay=0.5", "grpo.curriculum_key=kind"]
    assert lmforge(*args).returncode == 0
    whole = _timeless(out / stage / "metrics.jsonl")
    summary = json.loads((out / stage / "summary.json").read_text())
    weights = load_tensors(out / stage / "model.safetensors")
    if stage == "grpo":
        # the curriculum's chances, logged each step, moved off uniform as groups came in
        shares = [r["curriculum"] for r in whole]
        kinds = len(shares[0])
        assert kinds >= 2 and set(shares[0]) <= set(TEMPLATES)
        assert set(shares[0].values()) == {round(1 / kinds, 3)} and shares[-1] != shares[0]
        assert all(sum(x.values()) == pytest.approx(1, abs=0.01) for x in shares)
        by_kind, n = summary["arith_accuracy_by_kind"], summary["eval_prompts"]
        held = spread(read_prompts(out / "world" / "sft_eval_arithmetic.jsonl"), n)
        sizes = {k: sum(r["kind"] == k for r in held) for k in by_kind}
        assert sum(by_kind[k] * sizes[k] for k in by_kind) / n == pytest.approx(
            summary["arith_accuracy"], abs=1e-3
        )
        drawn = summary["curriculum"]
        assert sum(x["share_drawn"] for x in drawn.values()) == pytest.approx(1, abs=1e-3)
        # its model is the average of its weights, not the last of them
        last = out / stage / "checkpoints" / "step_00000004"
        average = load_tensors(last / "average.safetensors")
        for name, tensor in average.items():
            assert torch.equal(weights[name], tensor), name
        final = load_tensors(last / "model.safetensors")
        assert any(not torch.equal(final[name], tensor) for name, tensor in average.items())
    # as if killed after the checkpoint of step 2: that checkpoint is the newest
    shutil.rmtree(out / stage / "checkpoints" / "step_00000004")
    proc = lmforge(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "step 2" in proc.stderr
    resumed = _timeless(out / stage / "metrics.jsonl")
    assert [r["step"] for r in resumed if "lr" in r] == [1, 2, 3, 4]
    assert resumed == whole
    assert any(r["loss"] != 0.0 for r in resumed[2:])  # the resumed steps did update
    again = json.loads((out / stage / "summary.json").read_text())
    figures, batch_key = RESUMABLE[stage]
    for key in figures:
        assert again[key] == summary[key], key
    for name, tensor in load_tensors(out / stage / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    # a batch of another shape would draw other prompts: refused, naming both values
    shutil.rmtree(out / stage / "checkpoints" / "step_00000004")
    proc = lmforge(*args, "--resume", f"{stage}.{batch_key}=2")
    assert proc.returncode == 2 and f"{batch_key} 2" in proc.stderr, proc.stderr
    if stage == "grpo":  # and so would another average, or none, or no curriculum
        proc = lmforge(*args, "--resume", "grpo.average_decay=0")
        assert proc.returncode == 2 and "average_decay 0.5" in proc.stderr, proc.stderr
        proc = lmforge(*args, "--resume", "grpo.curriculum_key=null")
        assert proc.returncode == 2 and "curriculum" in proc.stderr, proc.stderr
        # a key the prompts lack is refused, naming it and the file
        proc = lmforge(*args, "grpo.curriculum_key=level")
        assert proc.returncode == 2 and "'level'" in proc.stderr and "rl_train" in proc.stderr
    # so would another starting model (the SFT model trained again, say)
    (out / "sft").unlink()
    (out / "sft").symlink_to(tiny_run / "pretrain")
    proc = lmforge(*args, "--resume")
    assert proc.returncode == 2 and "base_model_sha256" in proc.stderr, proc.stderr
    # a fresh run sets the earlier run's checkpoints aside, where --resume does not look
    assert lmforge(*args, f"{stage}.steps=2", f"{stage}.checkpoint_every=1").returncode == 0
    kept = sorted(p.name for p in (out / stage / "checkpoints").iterdir())
    assert kept == ["step_00000001", "step_00000002"]
    assert [p.name for p in (out / stage / "checkpoints.previous").iterdir()] == ["step_00000002"]
    # a run stopped by its time limit checkpoints its last step (here the first)
    assert lmforge(*args, f"{stage}.time_limit=0.001").returncode == 0
    kept = sorted(p.name for p in (out / stage / "checkpoints").iterdir())
    assert kept == ["step_00000001"]
    # --resume with no checkpoint starts fresh too: no steps logged twice
    shutil.rmtree(out / stage / "checkpoints")
    assert lmforge(*args, f"{stage}.steps=2", "--resume").returncode == 0
    assert [r["step"] for r in _timeless(out / stage / "metrics.jsonl") if "lr" in r] == [1, 2]


def _in_one_and_two_processes(
    stage: str,
    args: list,
    tiny_run: Path,
    tmp_path: Path,
    inputs: tuple = ("world", "tokenizer", "pretrain", "sft"),
) -> tuple:
    """`stage` run under torchrun in 1 and in 2 processes on the tiny run's `inputs`: for
    each, its logged steps (without timings), its summary and its weights; then the
    2-process command."""
    runs = []
    for n in (1, 2):
        out = tmp_path / f"x{n}"
        cmd = torchrun_stage(stage, args, n, tiny_run, out, inputs)
        summary = json.loads((out / stage / "summary.json").read_text())
        weights = load_tensors(out / stage / "model.safetensors")
        runs.append((_timeless(out / stage / "metrics.jsonl"), summary, weights))
    return runs[0], runs[1], cmd


@pytest.mark.parametrize("level", ["token", "constant"])
def test_grpo_in_two_processes_takes_the_steps_of_one(level, tiny_run, tmp_path):
    # a length reward makes every group informative; 2 passes of 3 minibatches a step, the
    # second of which straddles the two ranks' rows
    args = ["--config", TINY, "grpo.steps=3", "grpo.rewards={verifiable=1.0, length=0.5}"]
    args += ["grpo.iterations=2", "grpo.minibatches=3", f"grpo.loss_level={level}"]
    if level == "constant":  # prompts drawn by the curriculum, from what every rank learned
        args += ["grpo.curriculum_key=kind"]
    (one, first, a), (two, second, b), cmd = _in_one_and_two_processes(
        "grpo", args, tiny_run, tmp_path
    )
    # each rank samples half the prompts, each reply with its own seed: the same replies
    for key in ("sample_accuracy", "skipped_groups", "reply_tokens", "reward"):
        assert [r[key] for r in one] == [r[key] for r in two], key
    if level == "constant":
        assert [r["curriculum"] for r in one] == [r["curriculum"] for r in two]
        assert one[-1]["curriculum"] != one[0]["curriculum"]
    # and the steps are the whole batch's (figures combined over ranks keep 4 places)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=1e-4)
    assert all(r["loss"] != 0.0 for r in one) and len(one) == 3
    assert first["device"] == "cpu x 1" and second["device"] == "cpu x 2"
    for key in ("arith_accuracy", "arith_accuracy_before", "samples", "skipped_groups"):
        assert first[key] == second[key], key
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    start = load_tensors(tiny_run / "sft" / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)
    # prompts that do not split evenly over the processes are refused, naming the key
    proc = subprocess.run(
        [*cmd, "grpo.prompts_per_step=3"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode != 0 and "grpo.prompts_per_step 3" in proc.stderr, proc.stderr[-2000:]


def test_the_default_pipeline_runs_under_torchrun(tiny_run, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_command(2, "run", "--config", TINY, "--out", out)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}
    assert sorted(summaries) == sorted(load_config(Path(TINY)).stages)
    # rank 0 alone made the world; every rank trained each later stage, each waiting for
    # the stage before it to be written
    for stage in ("pretrain", "sft", "rm", "dpo", "grpo"):
        assert summaries[stage]["device"] == "cpu x 2", stage
    world = json.loads((tiny_run / "world" / "summary.json").read_text())
    assert {k: v for k, v in summaries["world"].items() if k != "seconds"} == {
        k: v for k, v in world.items() if k != "seconds"
    }
    assert proc.stdout.count("grpo: {") == 1  # one rank reports
    assert proc.stderr.count("training prompts") == 1  # rm's data line, once
    # a stage that runs in one process is refused before any work, naming it
    proc = subprocess.run(
        [*cmd, 'stages=["world", "rlaif"]'], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode != 0 and "['rlaif'] run in one process" in proc.stderr, proc.stderr
    assert not (out / "rlaif").exists()


def test_ppo_in_two_processes_takes_the_steps_of_one(tiny_run, tmp_path):
    # adaptive beta, the pretraining mix and rank 0's probes; 2 passes of 3 minibatches over
    # 8 replies a step
    args = ["--config", TINY, "ppo.steps=3", "ppo.kl_target=1.0", "ppo.ptx_coef=0.5"]
    args += ["ppo.iterations=2", "ppo.minibatches=3", "ppo.eval_every=2"]
    (logged_one, first, a), (logged_two, second, b), cmd = _in_one_and_two_processes(
        "ppo", args, tiny_run, tmp_path, ("world", "tokenizer", "pretrain", "sft", "rm")
    )
    one, two = ([r for r in logged if "lr" in r] for logged in (logged_one, logged_two))
    # each rank samples half the prompts, each reply with its own seed: the same replies
    for key in ("score", "reply_tokens", "truncated"):
        assert [r[key] for r in one] == [r[key] for r in two], key
    # whitening, KL and beta over both ranks' replies, and the one process's steps
    for key in ("loss", "kl", "beta", "explained_variance", "ptx_loss"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-4), key
    assert len(one) == 3 and all(r["loss"] != 0.0 for r in one)
    assert first["device"] == "cpu x 1" and second["device"] == "cpu x 2"
    assert first["pretrain_loss_delta"] == pytest.approx(second["pretrain_loss_delta"], abs=1e-4)
    # rank 0 probed before steps 1 and 3 and after the last
    probes = [[r["eval_gold"] for r in run if "eval_gold" in r] for run in (logged_one, logged_two)]
    assert len(probes[0]) == 3 and probes[0] == pytest.approx(probes[1], abs=1e-4)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # prompts that do not split evenly over the processes are refused, naming the key
    proc = subprocess.run(
        [*cmd, "ppo.prompts_per_step=3"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode != 0 and "ppo.prompts_per_step 3" in proc.stderr, proc.stderr[-2000:]
