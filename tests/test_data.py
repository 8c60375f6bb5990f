"""Data: record readers with file:line errors and skip reports; token shards and batches."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.data.readers import DataError, SkipReport, read_records, read_texts
from lmforge.data.shards import TokenBatches, load_shard, write_shard

RECORDS = [{"text": "hello"}, {"text": "你好 😀", "source": "x"}, {"text": "", "n": 3}]


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---- readers ---------------------------------------------------------------------------------
def test_read_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(RECORDS[:2]) + "\n   \n" + _jsonl(RECORDS[2:]), encoding="utf-8")
    got = list(read_records(path))
    # blank lines are skipped, but line numbers still count them
    assert got == [(f"{path}:1", RECORDS[0]), (f"{path}:2", RECORDS[1]), (f"{path}:5", RECORDS[2])]


def test_read_jsonl_gz(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(_jsonl(RECORDS))
    got = list(read_records(path))
    assert [r for _, r in got] == RECORDS
    assert [w for w, _ in got] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_read_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    got = list(read_records(path))
    assert [r for _, r in got] == RECORDS
    assert [w for w, _ in got] == [f"{path}:[{i}]" for i in range(3)]


def test_json_that_is_not_an_array_raises(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path))):
        list(read_records(path))
    path.write_text('[{"text": "x"}, ', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not valid JSON"):
        list(read_records(path))


def test_json_array_item_that_is_not_an_object_names_its_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a"}, 7]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:[1]")):
        list(read_records(path))


def test_read_txt_is_one_record(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert list(read_records(path)) == [(f"{path}:1", {"text": "line one\nline two\n"})]


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(read_records(tmp_path / "none.jsonl"))


@pytest.mark.parametrize(
    "bad_line", ['{"text": "unterminated', "not json at all", "[1, 2]", '"a string"', "null"]
)
def test_malformed_line_raises_with_file_and_line(tmp_path, bad_line):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(RECORDS[:2]) + bad_line + "\n" + _jsonl(RECORDS[2:]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3")):
        list(read_records(path))


def test_malformed_gz_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(_jsonl(RECORDS[:1]) + "{oops\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2")):
        list(read_records(path))


def test_skip_report_counts_bad_lines_and_keeps_good_ones(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(RECORDS[0]),
        "{broken",
        json.dumps(RECORDS[1]),
        "[1, 2]",
        json.dumps(RECORDS[2]),
        "",
        "42",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    skips = SkipReport()
    got = list(read_records(path, skips))
    assert got == [(f"{path}:1", RECORDS[0]), (f"{path}:3", RECORDS[1]), (f"{path}:5", RECORDS[2])]
    assert [w for w, _ in skips.skipped] == [f"{path}:2", f"{path}:4", f"{path}:7"]
    assert "not valid JSON" in skips.skipped[0][1]
    assert "list" in skips.skipped[1][1] and "int" in skips.skipped[2][1]


def test_skip_report_for_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS[0], "x", RECORDS[1]]), encoding="utf-8")
    skips = SkipReport()
    assert [r for _, r in read_records(path, skips)] == RECORDS[:2]
    assert [w for w, _ in skips.skipped] == [f"{path}:[1]"]


INVALID_UTF8 = b'{"text": "a"}\n{"text": "\xff\xfe"}\n{"text": "c"}\n'


def test_invalid_utf8_line_error_names_file_and_line(tmp_path):
    """A line that is not UTF-8 is a malformed record like any other: the error names file:line."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(INVALID_UTF8)
    with pytest.raises(DataError, match=re.escape(f"{path}:2")):
        list(read_records(path))


def test_invalid_utf8_line_is_skippable(tmp_path):
    """With a skip report, a non-UTF-8 line is counted and the records around it are kept."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(INVALID_UTF8)
    skips = SkipReport()
    got = list(read_records(path, skips))
    assert got == [(f"{path}:1", {"text": "a"}), (f"{path}:3", {"text": "c"})]
    assert [w for w, _ in skips.skipped] == [f"{path}:2"]


def test_read_texts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl([{"text": "a"}, {"body": "b", "text": "c"}]), encoding="utf-8")
    assert list(read_texts(path)) == ["a", "c"]
    path.write_text(_jsonl([{"body": "a"}, {"body": "b"}]), encoding="utf-8")
    assert list(read_texts(path, key="body")) == ["a", "b"]


@pytest.mark.parametrize("second", [{"title": "no text"}, {"text": 3}, {"text": None}])
def test_read_texts_missing_key_names_the_line(tmp_path, second):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl([{"text": "ok"}, second, {"text": "ok"}]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*'text'"):
        list(read_texts(path))
    skips = SkipReport()
    assert list(read_texts(path, skips=skips)) == ["ok", "ok"]
    assert [w for w, _ in skips.skipped] == [f"{path}:2"]


# ---- shards ----------------------------------------------------------------------------------
def test_write_and_load_shard_round_trip(tmp_path):
    path = tmp_path / "train.npy"
    docs = [[10, 11, 12], [], [65_535, 7]]
    n = write_shard(path, docs, bos_id=1, eos_id=2, vocab_size=65_536)
    expected = [1, 10, 11, 12, 2, 1, 2, 1, 65_535, 7, 2]
    assert n == len(expected)
    tokens = load_shard(path)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert isinstance(tokens, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npy"]  # no temp left


def test_large_vocab_shard_is_uint32(tmp_path):
    path = tmp_path / "big.npy"
    write_shard(path, [[70_000, 3]], bos_id=1, eos_id=2, vocab_size=100_000)
    tokens = load_shard(path)
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [1, 70_000, 3, 2]


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.npy"
    assert write_shard(path, [], bos_id=1, eos_id=2, vocab_size=300) == 0
    assert load_shard(path).tolist() == []


SEQ, N_TOKENS = 4, 99  # (99 - 4) // 4 = 23 windows


@pytest.fixture
def batches():
    tokens = np.arange(N_TOKENS, dtype=np.uint16)  # the token equals its position
    return TokenBatches(tokens, seq_len=SEQ, global_batch=4, seed=7)


def test_targets_are_inputs_shifted_by_one(batches):
    assert batches.n_windows == (N_TOKENS - SEQ) // SEQ == 23
    x, y = batches.micro_batch(step=3, micro=0, micro_batch=4, rank=0, world_size=1)
    assert x.shape == y.shape == (4, SEQ)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # windows are contiguous runs of the shard (tokens == positions)
    assert torch.equal(y, x + 1)
    assert torch.equal(x - x[:, :1], torch.arange(SEQ).expand(4, SEQ))
    # all windows of an epoch share one offset: starts are offset + k * seq_len
    assert len({int(s) % SEQ for s in x[:, 0]}) == 1


def test_same_seed_and_step_give_identical_batches(batches):
    tokens = np.arange(N_TOKENS, dtype=np.uint16)
    other = TokenBatches(tokens, seq_len=SEQ, global_batch=4, seed=7)
    for step in (0, 5, 11, 40):  # 40 * 4 crosses into later epochs
        a = batches.micro_batch(step, 0, 4, 0, 1)
        b = other.micro_batch(step, 0, 4, 0, 1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # asking out of order (epoch cache going back and forth) changes nothing
    first = batches.micro_batch(0, 0, 4, 0, 1)[0]
    batches.micro_batch(30, 0, 4, 0, 1)
    assert torch.equal(batches.micro_batch(0, 0, 4, 0, 1)[0], first)
    different = TokenBatches(tokens, seq_len=SEQ, global_batch=4, seed=8)
    starts = [different.micro_batch(s, 0, 4, 0, 1)[0][:, 0].tolist() for s in range(3)]
    assert starts != [batches.micro_batch(s, 0, 4, 0, 1)[0][:, 0].tolist() for s in range(3)]


def _windows(batch) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch[0].tolist()]


def test_any_split_of_the_global_batch_sees_the_same_windows():
    tokens = np.arange(4 * 60 + 1, dtype=np.uint16)
    data = TokenBatches(tokens, seq_len=SEQ, global_batch=8, seed=3)
    for step in (0, 1, 9):
        whole = _windows(data.micro_batch(step, 0, 8, 0, 1))  # 1 rank x 1 micro of 8
        one_rank_two_micro = [
            w for m in range(2) for w in _windows(data.micro_batch(step, m, 4, 0, 1))
        ]
        two_ranks_one_micro = [
            w for r in range(2) for w in _windows(data.micro_batch(step, 0, 4, r, 2))
        ]
        four_ranks_two_micro = [
            w
            for r in range(4)
            for m in range(2)
            for w in _windows(data.micro_batch(step, m, 1, r, 4))
        ]
        assert Counter(one_rank_two_micro) == Counter(whole)
        assert Counter(two_ranks_one_micro) == Counter(whole)
        assert Counter(four_ranks_two_micro) == Counter(whole)
        # and the ranks' shares are disjoint
        r0 = set(_windows(data.micro_batch(step, 0, 4, 0, 2)))
        r1 = set(_windows(data.micro_batch(step, 0, 4, 1, 2)))
        assert not r0 & r1


def test_one_epoch_visits_every_window_once():
    n_windows = 12
    tokens = np.arange(SEQ * (n_windows + 1) + 2, dtype=np.uint16)
    data = TokenBatches(tokens, seq_len=SEQ, global_batch=3, seed=5)
    assert data.n_windows == n_windows
    starts = []
    for step in range(n_windows // 3):
        starts += data.micro_batch(step, 0, 3, 0, 1)[0][:, 0].tolist()
    offset = starts[0] % SEQ
    assert sorted(starts) == [offset + k * SEQ for k in range(n_windows)]
    # the next epoch again visits every window once, in a fresh order
    nxt = []
    for step in range(n_windows // 3, 2 * n_windows // 3):
        nxt += data.micro_batch(step, 0, 3, 0, 1)[0][:, 0].tolist()
    offset2 = nxt[0] % SEQ
    assert sorted(nxt) == [offset2 + k * SEQ for k in range(n_windows)]
    assert nxt != starts
    # every window, including the last, fits in the shard
    assert max(starts + nxt) + SEQ + 1 <= len(tokens)


def test_fixed_batch_is_unshuffled(batches):
    x, y = batches.fixed_batch(index=1, micro_batch=2, rank=1, world_size=2)
    # global samples 6 and 7 -> windows starting at 24 and 28
    assert x[:, 0].tolist() == [24, 28]
    assert torch.equal(y, x + 1)


def test_too_few_tokens_raise():
    with pytest.raises(ValueError, match="too few"):
        TokenBatches(np.arange(7, dtype=np.uint16), seq_len=4, global_batch=1, seed=0)


def test_parquet_is_read_in_batches_with_row_locations(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the dev extra")
    import pyarrow as pa

    path = tmp_path / "docs.parquet"
    texts = [f"document {i} 😀 文本" for i in range(2500)]  # more than one 1024-row batch
    pq.write_table(pa.table({"text": texts, "source": ["web"] * 2500}), path)
    records = list(read_records(path))
    assert [r["text"] for _, r in records] == texts
    assert records[2049][0] == f"{path}:row 2049"
    assert list(read_texts(path))[-1] == "document 2499 😀 文本"
