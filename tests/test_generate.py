"""Generation: the cached, batched, left-padded engine against a plain full-forward reference."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.generate import decode_steps, generate, invert_cdf, sample_completions, sample_next
from lmforge.model import native

PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 26], [42], [7, 7, 8, 100, 2]]


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def engine(request, monkeypatch):
    """Every test runs with each decoding step: the C++ one (`lmforge.model.native`) and
    PyTorch's (the reference without a cache is always PyTorch's)."""
    if request.param == "native" and native.library() is None:
        pytest.skip("the C++ decoding step could not be built here (no C++ compiler)")
    monkeypatch.setenv("LMFORGE_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.fixture(scope="module")
def model(make_model):
    # untied with a large init so that logits are spread and greedy outputs vary
    return make_model(seed=11, vocab_size=128, tie_embeddings=False, init_std=0.5)


def reference_greedy(model, prompt, n):
    """Greedy decoding by re-running the full sequence, one prompt at a time, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def reference(model):
    return [reference_greedy(model, p, 10) for p in PROMPTS]


def test_reference_outputs_vary(reference):
    # guards the other tests: a model that always says the same token would prove nothing
    assert len({tok for row in reference for tok in row}) > 5
    assert len({tuple(row) for row in reference}) == len(PROMPTS)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_equals_each_prompt_alone(model, reference, use_cache):
    out = generate(model, PROMPTS, 10, temperature=0.0, use_cache=use_cache)
    assert out == reference


def test_repeated_prompts_share_a_prefill_and_decode_as_if_alone(model, reference):
    # rows 0, 2 and 3 repeat prompt 1 and row 4 prompt 0 (a GRPO group, best-of-N): the
    # prompts are computed once, then each row decodes on its own copy of the cache
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    out = generate(model, prompts, 10, temperature=0.0)
    assert out == [
        reference[1],
        reference[0],
        reference[1],
        reference[1],
        reference[0],
        reference[2],
    ]
    # sampled: the same draws and log-probabilities as the path without a cache
    cached = sample_completions(model, prompts, 8, seed=5, with_logprobs=True)
    uncached = sample_completions(model, prompts, 8, seed=5, with_logprobs=True, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in uncached]
    assert len({tuple(c.tokens) for c in cached[:4:2]}) == 2  # rows of one prompt differ
    for a, b in zip(cached, uncached):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_greedy_with_cache_equals_without(model):
    a = generate(model, PROMPTS, 12, temperature=0.0, use_cache=True)
    b = generate(model, PROMPTS, 12, temperature=0.0, use_cache=False)
    assert a == b
    assert all(len(row) == 12 for row in a)


def test_single_prompt_and_equal_lengths_without_padding(model, reference):
    assert generate(model, [PROMPTS[1]], 10, temperature=0.0) == [reference[1]]
    same_len = [PROMPTS[0], [9, 8, 7]]
    expected = [reference[0], reference_greedy(model, [9, 8, 7], 10)]
    assert generate(model, same_len, 10, temperature=0.0) == expected


@pytest.mark.parametrize("pad_id", [0, 5, 127])
def test_padding_value_is_invisible(model, reference, pad_id):
    assert generate(model, PROMPTS, 10, temperature=0.0, pad_id=pad_id) == reference


def test_stop_tokens_end_a_row_and_are_not_returned(model, reference):
    stop = reference[1][3]  # row 1 stops at (the first occurrence of) this token
    expected = [row[: row.index(stop)] if stop in row else row for row in reference]
    out = generate(model, PROMPTS, 10, temperature=0.0, stop_ids=[stop])
    assert out == expected
    assert all(stop not in row for row in out)
    assert len(out[1]) <= 3


def test_all_rows_stopping_ends_generation(model, reference):
    stops = sorted({row[0] for row in reference})  # every row stops at its first token
    out = generate(model, PROMPTS, 10, temperature=0.0, stop_ids=stops)
    assert out == [[] for _ in PROMPTS]
    # a stop on the second token returns exactly the first
    stops = sorted({row[1] for row in reference} - {row[0] for row in reference})
    expected = []
    for row in reference:
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        expected.append(row[:cut])
    assert generate(model, PROMPTS, 10, temperature=0.0, stop_ids=stops) == expected


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=-1.0), logits.argmax(-1))


def test_top_k_one_is_greedy(model, reference):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, 1.5, top_k=1, generator=g), logits.argmax(-1))
    out = generate(model, PROMPTS, 10, temperature=2.0, top_k=1, seed=3)
    assert out == reference


def test_top_k_restricts_to_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).repeat(2000, 1)
    picks = sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 3}


def _nucleus_draws(top_p, n=4000, seed=0):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(n, 1)
    return sample_next(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(seed))


def test_top_p_keeps_the_smallest_nucleus():
    # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    draws = _nucleus_draws(0.7)
    assert set(draws.tolist()) == {0, 1}
    # renormalised: p(0) = 0.5 / 0.8
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.04
    # 0.8 < 0.85 <= 0.95: the nucleus is {0, 1, 2}
    draws = _nucleus_draws(0.85)
    assert set(draws.tolist()) == {0, 1, 2}
    assert abs((draws == 2).float().mean().item() - 0.15 / 0.95) < 0.03
    # a tiny top_p keeps only the most likely token
    assert set(_nucleus_draws(0.1).tolist()) == {0}
    # top_p = 1 keeps everything
    assert set(_nucleus_draws(1.0).tolist()) == {0, 1, 2, 3}


def test_top_p_is_per_row_and_order_independent():
    # the same distribution in a shuffled order, two rows with different nuclei
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log().repeat(2000, 1)
    draws = sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(1))
    assert set(draws[0::2].tolist()) == {1, 3}
    assert len(set(draws[1::2].tolist())) == 3  # 0.25 * 3 = 0.75 reaches 0.7


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[math.log(0.8), math.log(0.2)]]).repeat(6000, 1)
    g = torch.Generator().manual_seed(2)
    # at temperature 2, p is proportional to sqrt(p): sqrt(.8) / (sqrt(.8) + sqrt(.2)) = 2/3
    p0 = (sample_next(logits, 2.0, generator=g) == 0).float().mean().item()
    assert abs(p0 - 2 / 3) < 0.03


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, PROMPTS, 10, temperature=3.0, seed=123)
    b = generate(model, PROMPTS, 10, temperature=3.0, seed=123)
    c = generate(model, PROMPTS, 10, temperature=3.0, seed=124)
    assert a == b
    assert a != c
    assert all(len(row) == 10 for row in a)
    assert all(0 <= t < 128 for row in a for t in row)


def test_a_row_with_its_own_seed_draws_the_same_whatever_else_is_in_the_batch(model):
    seeds = [11, 12, 13, 14]
    together = sample_completions(model, PROMPTS, 10, temperature=3.0, seed=seeds, pad_id=0)
    for i, prompt in enumerate(PROMPTS):
        alone = sample_completions(model, [prompt], 10, temperature=3.0, seed=[seeds[i]])[0]
        assert alone.tokens == together[i].tokens
    other = sample_completions(model, PROMPTS, 10, temperature=3.0, seed=[11, 12, 13, 15], pad_id=0)
    assert [c.tokens for c in other[:3]] == [c.tokens for c in together[:3]]
    assert other[3].tokens != together[3].tokens
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        generate(model, PROMPTS, 3, seed=[1, 2])


def test_finished_rows_leave_the_batch_and_the_others_decode_as_if_alone(model, count_rows):
    prompts = PROMPTS + PROMPTS[::-1]
    budgets, seeds = [2, 9, 3, 8, 4, 7, 5, 6], [21, 22, 23, 24, 25, 26, 27, 28]
    with count_rows(model) as rows_per_call:
        steps = list(
            decode_steps(model, prompts, budgets, seed=seeds, pad_id=3, with_logprobs=True)
        )
    # the prefill computes the 4 distinct prompts; then the batch shrinks as rows spend their
    # budgets: 8 rows, then fewer, down to the one with the largest budget
    assert len(steps) == 9 and rows_per_call[0] == 4
    decoded = rows_per_call[1:]
    assert decoded[0] == 8 and decoded[-1] == 1
    assert sorted(decoded, reverse=True) == decoded and len(set(decoded)) >= 4
    together = sample_completions(model, prompts, budgets, seed=seeds, with_logprobs=True)
    uncached = sample_completions(model, prompts, budgets, seed=seeds, use_cache=False)
    for i, prompt in enumerate(prompts):
        alone = sample_completions(model, [prompt], budgets[i], seed=[seeds[i]], with_logprobs=True)
        assert together[i].tokens == alone[0].tokens == uncached[i].tokens
        assert len(alone[0].tokens) == budgets[i]
        # the test model's logits are large (init_std 0.5): 1e-5 apart in one CI run
        assert together[i].logprobs == pytest.approx(alone[0].logprobs, abs=1e-4)
        # after its last token a row draws pad and stays done, in or out of the batch
        assert [int(s.tokens[i]) for s in steps[budgets[i] :]] == [3] * (9 - budgets[i])
        assert [bool(s.done[i]) for s in steps] == [t >= budgets[i] - 1 for t in range(9)]
    # in the last step only row 1 is decoded; the rows that have left report log-probability 0
    last = steps[-1].logprobs.tolist()
    assert last[1] < 0 and last[:1] + last[2:] == [0.0] * 7


def test_abandoned_rows_leave_the_batch_and_the_others_decode_on_unchanged(model, count_rows):
    """Rows the caller gives up on while a step is yielded (`abandoned`: a stop text, a client
    gone) are finished from the next step on and leave the batch; the others draw the tokens
    they draw without it."""
    prompts, seeds = PROMPTS, [31, 32, 33, 34]
    whole = sample_completions(model, prompts, 10, seed=seeds, pad_id=3)
    abandoned = torch.zeros(4, dtype=torch.bool)
    steps = []
    with count_rows(model) as rows_per_call:
        for step in decode_steps(model, prompts, 10, seed=seeds, pad_id=3, abandoned=abandoned):
            steps.append(step)
            if step.index == 2:
                abandoned[[0, 2]] = True
    assert len(steps) == 10
    # the prefill (step 0) and steps 1 and 2 of all 4 rows (rows 0 and 2 are given up while
    # step 2 is yielded), then steps 3-9 of the two others alone
    assert rows_per_call == [4, 4, 4] + [2] * 7
    for i in (1, 3):
        assert [int(s.tokens[i]) for s in steps] == whole[i].tokens
    for i in (0, 2):
        assert [int(s.tokens[i]) for s in steps[:3]] == whole[i].tokens[:3]
        assert [int(s.tokens[i]) for s in steps[3:]] == [3] * 7
        assert [bool(s.done[i]) for s in steps] == [False] * 3 + [True] * 7


def test_too_long_request_raises(model):
    # max_seq_len is 64: the longest prompt (7) + 57 fits exactly, + 58 does not
    assert len(generate(model, PROMPTS, 57, temperature=0.0)[1]) == 57
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, PROMPTS, 58, temperature=0.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [list(range(65))], 1)


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError):
        generate(model, [], 3)


def test_inverting_the_cdf_draws_each_token_with_its_probability():
    probs = torch.rand(1, 50, generator=torch.Generator().manual_seed(3)) ** 4
    probs[0, 7] = 0.0  # an impossible token
    expected = probs[0] / probs.sum()
    draws = sample_next(
        probs.log().repeat(40_000, 1), 1.0, generator=torch.Generator().manual_seed(4)
    )
    freq = torch.bincount(draws, minlength=50).float() / draws.numel()
    assert freq[7] == 0
    assert (freq - expected).abs().max() < 0.01
    # chi-square over the possible tokens: 48 degrees of freedom, p = 0.001 at 84
    possible = expected > 0
    chi2 = (((freq - expected)[possible] ** 2) / expected[possible]).sum() * draws.numel()
    assert chi2 < 84


def test_inverting_the_cdf_never_reaches_an_impossible_token_at_the_edges():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).repeat(3, 1)
    uniform = torch.tensor([[0.0], [0.25], [1.0 - 2**-24]])
    assert invert_cdf(probs, uniform).tolist() == [1, 3, 3]
    # a total below one (unnormalised, as after masking) scales the point, not the result
    assert invert_cdf(probs * 0.3, uniform).tolist() == [1, 3, 3]


def test_a_tiny_temperature_samples_the_argmax_and_broken_rows_fail_clearly():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1e-38, generator=g), logits.argmax(-1))
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        sample_next(logits, 1.0, generator=g)


def test_a_sliver_of_an_interval_never_draws_an_impossible_token(monkeypatch):
    # a cdf summed in another order (CUDA's parallel scan) can rise by a rounding step over
    # a zero-probability token, and the search land on it: stand in for that search
    probs = torch.tensor([[0.2, 0.0, 0.3, 0.0, 0.0, 0.5], [0.2, 0.0, 0.3, 0.0, 0.0, 0.5]])
    landed = torch.tensor([[4], [5]])
    monkeypatch.setattr(torch, "searchsorted", lambda *args, **kwargs: landed.clone())
    # row 0 steps back to token 2, the last possible one before 4; row 1 keeps token 5
    assert invert_cdf(probs, torch.tensor([[0.5], [0.9]])).tolist() == [2, 5]
