"""Preference data: pairs, HH-RLHF dialogues and rankings to weighted pairs; unpaired labels."""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import pytest

from lmforge.data.preferences import Labelled, Pair, hh_dialogue, read_labelled, read_pairs
from lmforge.data.readers import DataError, SkipReport

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf"
USER_Q = [{"role": "user", "content": "Q?"}]


def _write(tmp_path, records, name="prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _hh(*turns: str) -> str:
    """An HH-RLHF dialogue of alternating Human/Assistant turns."""
    return "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)
    )


# ---- rankings --------------------------------------------------------------------------------
def test_ranking_of_four_gives_six_pairs_weighing_one_sixth(tmp_path):
    record = {"prompt": "Q?", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    path = _write(tmp_path, [record])
    pairs, report = read_pairs(path)
    # best first: c > a > d > b; every ordered pair, better-ranked response chosen
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("c", "a"),
        ("c", "d"),
        ("c", "b"),
        ("a", "d"),
        ("a", "b"),
        ("d", "b"),
    ]
    assert [p.weight for p in pairs] == [1 / 6] * 6
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)
    assert all(p.messages == USER_Q and p.margin == 0.0 for p in pairs)
    assert {p.where for p in pairs} == {f"{path}:1"}
    assert report == {
        "records": 1,
        "pairs": 6,
        "dropped_identical": 0,
        "dropped_mismatched_prompt": 0,
        "dropped_where": [],
        "skipped": 0,
    }


def test_ranking_of_two_is_one_pair_of_weight_one(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    path = _write(tmp_path, [{"messages": messages, "responses": ["5", "4"], "ranking": [1, 0]}])
    pairs, _ = read_pairs(path)
    assert pairs == [Pair(messages, "4", "5", f"{path}:1", margin=0.0, weight=1.0)]


def test_every_ranking_weighs_one_whatever_its_size(tmp_path):
    records = [
        {"prompt": f"Q{k}", "responses": [str(i) for i in range(k)], "ranking": list(range(k))}
        for k in (2, 3, 5)
    ]
    pairs, report = read_pairs(_write(tmp_path, records))
    assert report["pairs"] == 1 + 3 + 10 == len(pairs)
    for k in (2, 3, 5):
        mine = [p for p in pairs if p.messages[0]["content"] == f"Q{k}"]
        assert len(mine) == k * (k - 1) // 2
        assert sum(p.weight for p in mine) == pytest.approx(1.0)


def test_ranking_with_repeated_response_shares_weight_among_kept_pairs(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q?", "responses": ["x", "x ", "y"], "ranking": [0, 1, 2]}])
    pairs, report = read_pairs(path)
    assert [(p.chosen, p.rejected, p.weight) for p in pairs] == [("x", "y", 0.5), ("x ", "y", 0.5)]
    assert report["dropped_identical"] == 1
    assert report["dropped_where"] == [f"{path}:1"]


# ---- HH-RLHF ---------------------------------------------------------------------------------
def test_hh_dialogue_of_two_exchanges():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman:  What is 2+2? \n\nAssistant: 4."
    assert hh_dialogue(text, "f:1") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("\n\nAssistant: hi\n\nHuman: yo", "does not start with"),
        ("just text", "does not start with"),
        ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "do not alternate"),
        ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "do not alternate"),
        ("\n\nHuman: only a question", "no Assistant turn"),
    ],
)
def test_hh_dialogue_rejects_malformed_dialogues(text, problem):
    with pytest.raises(DataError, match=re.escape("data.jsonl:7: ") + ".*" + problem):
        hh_dialogue(text, "data.jsonl:7")


def test_hh_pair_splits_into_shared_context_and_final_replies(tmp_path):
    context = ("Hi there", "Hello! How can I help?", "What is 2+2?")
    record = {"chosen": _hh(*context, "It is 4."), "rejected": _hh(*context, "It is 5.")}
    path = _write(tmp_path, [record])
    pairs, report = read_pairs(path)
    assert pairs == [
        Pair(
            [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"},
            ],
            "It is 4.",
            "It is 5.",
            f"{path}:1",
        )
    ]
    assert report["pairs"] == 1 and report["records"] == 1


def test_hh_reply_that_runs_on_into_turn_like_text_is_kept_whole(tmp_path):
    # As in helpful-base test line 169: a sampled reply that invents "Humans:"/"Assistant:"
    # text is one reply, not extra turns, and the pair's context is still the shared one.
    runaway = "Sure, a list.\n\nHumans: first ten?\n\nAssistant: Alright..."
    path = _write(
        tmp_path, [{"chosen": _hh("Music?", "Shankar."), "rejected": _hh("Music?", runaway)}]
    )
    pairs, report = read_pairs(path)
    assert [(p.messages, p.chosen, p.rejected) for p in pairs] == [
        ([{"role": "user", "content": "Music?"}], "Shankar.", runaway)
    ]
    assert report["dropped_mismatched_prompt"] == 0


def test_mismatched_and_identical_pairs_are_dropped_and_counted(tmp_path):
    records = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},  # kept
        {"chosen": _hh("Bake bread?", "Use flour."), "rejected": _hh("Bake cake?", "Use eggs.")},
        {"prompt": "Q?", "chosen": "same ", "rejected": "\nsame"},  # identical after strip
        # the dialogues diverge at an earlier reply, so both run on into later turns
        {
            "chosen": _hh("Hi", "Hello", "Bye?", "Bye."),
            "rejected": _hh("Hi", "Go away", "Bye?", "Fine."),
        },
        {"chosen": _hh("Q?", "A."), "rejected": _hh("Q?", " A. ")},  # identical HH replies
        {"prompt": "Q?", "chosen": "better", "rejected": "worse", "margin": 2},  # kept
    ]
    path = _write(tmp_path, records)
    pairs, report = read_pairs(path)
    assert [(p.chosen, p.rejected, p.margin, p.where) for p in pairs] == [
        ("good", "bad", 0.0, f"{path}:1"),
        ("better", "worse", 2.0, f"{path}:6"),
    ]
    assert report == {
        "records": 6,
        "pairs": 2,
        "dropped_identical": 2,
        "dropped_mismatched_prompt": 2,
        "dropped_where": [f"{path}:{n}" for n in (2, 3, 4, 5)],
        "skipped": 0,
    }


def test_dropped_where_lists_only_the_first_twenty(tmp_path):
    records = [{"prompt": "Q?", "chosen": "x", "rejected": "x"}] * 25
    path = _write(tmp_path, records)
    _, report = read_pairs(path)
    assert report["dropped_identical"] == 25 and report["pairs"] == 0
    assert report["dropped_where"] == [f"{path}:{n}" for n in range(1, 21)]


def test_one_file_mixes_pairs_hh_and_rankings_and_json_arrays_name_items(tmp_path):
    records = [
        {"messages": USER_Q, "chosen": "a", "rejected": "b"},
        {"chosen": _hh("Q?", "a"), "rejected": _hh("Q?", "b")},
        {"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    pairs, report = read_pairs(path)
    assert report["records"] == 3 and report["pairs"] == 5
    assert all(p.messages == USER_Q for p in pairs)
    assert [p.where for p in pairs] == [f"{path}:[0]", f"{path}:[1]"] + [f"{path}:[2]"] * 3
    assert [p.weight for p in pairs] == [1.0, 1.0] + [pytest.approx(1 / 3)] * 3


# ---- malformed records -----------------------------------------------------------------------
GOOD = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "permutation"),
        ({"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "permutation"),
        ({"prompt": "Q?", "responses": ["a", "b"], "ranking": [1, 2]}, "permutation"),
        ({"prompt": "Q?", "responses": ["a", "b"], "ranking": [True, False]}, "permutation"),
        ({"prompt": "Q?", "responses": ["a"], "ranking": [0]}, "at least 2 responses"),
        ({"prompt": "Q?", "responses": ["a", 2], "ranking": [0, 1]}, "list of strings"),
        ({"prompt": "Q?", "chosen": "good"}, "needs 'rejected'"),
        ({"chosen": _hh("Q?", "a")}, "needs 'rejected'"),
        ({"prompt": "Q?", "chosen": "a", "rejected": ["b"]}, "'rejected' must be a string"),
        ({**GOOD, "margin": "high"}, "'margin' must be a finite number"),
        ({**GOOD, "margin": True}, "'margin' must be a finite number"),
        ({**GOOD, "margin": float("nan")}, "'margin' must be a finite number"),
        (  # two Human turns in a row in the shared context
            {
                "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d",
            },
            "do not alternate",
        ),
        ({"chosen": "good", "rejected": "bad"}, "not an HH-RLHF dialogue"),
        ({"chosen": _hh("Q?"), "rejected": _hh("Q?")}, "no Assistant turn"),
        ({"text": "hello"}, "expected a pair"),
        ({**GOOD, "responses": ["a", "b"], "ranking": [0, 1]}, "expected a pair"),
        ({"prompt": "Q?", "completion": "a", "label": True}, "read_labelled"),
        ({"messages": USER_Q, "prompt": "Q?", "chosen": "a", "rejected": "b"}, "exactly one of"),
        (
            {
                "messages": [*USER_Q, {"role": "assistant", "content": "A"}],
                "chosen": "a",
                "rejected": "b",
            },
            "must end with the user turn",
        ),
        (
            {"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
            "message 0",
        ),
    ],
)
def test_malformed_record_names_file_line_and_problem(tmp_path, record, problem):
    path = _write(tmp_path, [GOOD, record, GOOD])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(problem)):
        read_pairs(path)


def test_margin_is_a_float_and_null_means_none(tmp_path):
    path = _write(
        tmp_path, [{**GOOD, "margin": 3}, {**GOOD, "margin": 0.5}, {**GOOD, "margin": None}]
    )
    pairs, _ = read_pairs(path)
    assert [p.margin for p in pairs] == [3.0, 0.5, 0.0]
    assert all(isinstance(p.margin, float) for p in pairs)


def test_skip_report_counts_malformed_records_and_keeps_the_rest(tmp_path):
    path = tmp_path / "prefs.jsonl"
    bad_ranking = {"prompt": "Q?", "responses": ["a", "b"], "ranking": [0, 0]}
    path.write_text(
        "\n".join([json.dumps(GOOD), json.dumps(bad_ranking), "{not json", json.dumps(GOOD)])
        + "\n",
        encoding="utf-8",
    )
    skips = SkipReport()
    pairs, report = read_pairs(path, skips)
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:4"]
    assert [w for w, _ in skips.skipped] == [f"{path}:2", f"{path}:3"]
    assert "permutation" in skips.skipped[0][1]
    assert not skips.skipped[0][1].startswith(str(path))  # the reason, without the location
    # the unparseable line never becomes a record; the malformed record is counted as skipped
    assert report["records"] == 3 and report["skipped"] == 1 and report["pairs"] == 2


# ---- unpaired labels (KTO) -------------------------------------------------------------------
def test_read_labelled_converts_every_format_and_counts(tmp_path):
    records = [
        {"prompt": "Q?", "completion": "yes", "label": True},
        {"prompt": "Q?", "completion": "no", "label": False},
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]},  # b is the middle
        {"prompt": "Q?", "responses": ["a", "b", "c", "d"], "ranking": [3, 0, 1, 2]},
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},  # identical: dropped
        {"chosen": _hh("Q1", "x"), "rejected": _hh("Q2", "y")},  # mismatched: dropped
    ]
    path = _write(tmp_path, records)
    labels, report = read_labelled(path)
    assert [(x.completion, x.desirable, x.where) for x in labels] == [
        ("yes", True, f"{path}:1"),
        ("no", False, f"{path}:2"),
        ("good", True, f"{path}:3"),
        ("bad", False, f"{path}:3"),
        ("c", True, f"{path}:4"),
        ("a", False, f"{path}:4"),
        ("d", True, f"{path}:5"),
        ("a", True, f"{path}:5"),
        ("b", False, f"{path}:5"),
        ("c", False, f"{path}:5"),
    ]
    assert all(x.messages == USER_Q for x in labels)
    assert report == {
        "records": 7,
        "labelled": 10,
        "desirable": 5,
        "undesirable": 5,
        "dropped_identical": 1,
        "dropped_mismatched_prompt": 1,
        "dropped_middle": 1,
        "dropped_where": [f"{path}:6", f"{path}:7"],
        "skipped": 0,
    }


def test_read_labelled_hh_pair(tmp_path):
    path = _write(tmp_path, [{"chosen": _hh("Hi", "Hello"), "rejected": _hh("Hi", "Go away")}])
    labels, report = read_labelled(path)
    context = [{"role": "user", "content": "Hi"}]
    assert labels == [
        Labelled(context, "Hello", True, f"{path}:1"),
        Labelled(context, "Go away", False, f"{path}:1"),
    ]
    assert (report["desirable"], report["undesirable"]) == (1, 1)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "Q?", "completion": "a", "label": 1}, "'label' must be true or false"),
        ({"prompt": "Q?", "completion": "a"}, "'label' must be true or false"),
        ({"prompt": "Q?", "label": True}, "needs 'completion'"),
        ({"completion": "a", "label": True}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "Q?", "responses": ["a", "b"], "ranking": [0, 2]}, "permutation"),
    ],
)
def test_read_labelled_malformed_record_names_file_and_line(tmp_path, record, problem):
    path = _write(tmp_path, [{"prompt": "Q?", "completion": "a", "label": True}, record])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(problem)):
        read_labelled(path)


# ---- real HH-RLHF data -----------------------------------------------------------------------
needs_hh = pytest.mark.skipif(
    not HH.exists(), reason=f"HH-RLHF data (../shared/data/hh_rlhf) not found at {HH}"
)


@needs_hh
def test_real_hh_rlhf_first_records_convert(tmp_path):
    # Only test splits are staged (SOURCE.md: no train split was reachable).
    with gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = list(itertools.islice(f, 200))
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    pairs, report = read_pairs(path)
    assert report["records"] == 200
    assert report["pairs"] >= 0.95 * 200
    for p in pairs:
        assert p.messages[0]["role"] == "user" and p.messages[-1]["role"] == "user"
        assert [m["role"] for m in p.messages] == ["user", "assistant"] * (len(p.messages) // 2) + [
            "user"
        ]
        assert p.chosen.strip() != p.rejected.strip()


@needs_hh
def test_real_hh_rlhf_whole_split_with_skips():
    path = HH / "helpful-base" / "test.jsonl.gz"  # read_records reads .jsonl.gz directly
    skips = SkipReport()
    pairs, report = read_pairs(path, skips)
    assert report["records"] == 2354
    assert report["pairs"] >= 0.99 * report["records"]
    assert report["dropped_identical"] == 2  # as SOURCE.md counts them
    # the few skipped records have a context with a broken turn marker, each named
    assert report["skipped"] == len(skips.skipped) <= 0.005 * report["records"]
    assert all(re.fullmatch(re.escape(str(path)) + r":\d+", w) for w, _ in skips.skipped)
    assert all("do not alternate" in reason for _, reason in skips.skipped)
