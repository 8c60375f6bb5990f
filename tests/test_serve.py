"""`lmforge serve`: the engine, the web app's API and its database, the OpenAI API (with the
official client), bad input, access tokens, export into the rm stage, and judgements under
load and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import lmforge, train_rm_on_feedback  # noqa: E402
from serving import start_server  # noqa: E402

from lmforge.data.preferences import read_labelled, read_pairs  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.io import load_model_dir  # noqa: E402
from lmforge.serve.engine import Engine, Request, Sampling  # noqa: E402


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    with start_server(served_model, tmp_path_factory.mktemp("serve") / "feedback.sqlite3") as s:
        yield s


def rows(db: Path, table: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    finally:
        con.close()


def counts(db: Path) -> dict[str, int]:
    tables = ("conversations", "prompts", "responses", "judgements")
    return {t: len(rows(db, t)) for t in tables}


def respond(server, **body) -> list[dict]:
    body = {"annotator": "ann", "max_tokens": 8} | body
    with httpx.stream("POST", server.url + "/api/respond", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def judge(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/api/judgements", json={"annotator": "ann"} | body, timeout=30)


# ---- the engine, in process -----------------------------------------------------------------
def run_engine(engine: Engine, prompt: list[int], n: int, max_tokens: int, **options) -> list:
    events, finished = [], threading.Event()

    def emit(event):
        events.append(event)
        if sum(e.finish_reason is not None for e in events) == n:
            finished.set()

    engine.submit(
        Request(prompt, n, max_tokens, Sampling(**options.pop("sampling", {})), emit, **options)
    )
    assert finished.wait(60)
    return events


def test_engine_greedy_equals_generate_and_batches_concurrent_requests(served_model):
    model, tok = load_model_dir(served_model)
    engine = Engine(model, tok, max_batch=8)
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("The capital", "A river", "日本", "x")]
    want = generate(
        model, prompts, 12, temperature=0.0, stop_ids=engine.stop_ids, pad_id=tok.pad_id
    )
    results: dict[int, list] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(
                i, run_engine(engine, prompts[i], 1, 12, sampling={"temperature": 0.0})
            )
        )
        for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, events in results.items():
        (end,) = [e for e in events if e.finish_reason]
        assert end.text == tok.decode(want[i], skip_special=True), (
            i
        )  # batched with others, same greedy tokens
        assert end.tokens == len(want[i]) + (end.finish_reason == "stop")
        assert "".join(e.delta for e in events) == end.text or "\ufffd" in end.text
    assert engine.rows == 4 and engine.batches < 4  # at least two requests shared a batch
    engine.close()


def test_engine_stop_text_cuts_the_answer(served_model):
    model, tok = load_model_dir(served_model)
    engine = Engine(model, tok)
    prompt = [tok.bos_id, *tok.encode("The capital")]
    full = [
        e
        for e in run_engine(engine, prompt, 1, 20, sampling={"temperature": 0.0})
        if e.finish_reason
    ]
    text = full[0].text
    stop = text[3:5]
    assert len(stop) == 2 and stop not in text[:3]
    cut = run_engine(engine, prompt, 1, 20, sampling={"temperature": 0.0}, stop_texts=(stop,))
    (end,) = [e for e in cut if e.finish_reason]
    assert (end.text, end.finish_reason) == (text[: text.index(stop)], "stop")
    assert stop not in "".join(e.delta for e in cut)
    engine.close()


def test_a_cancelled_request_leaves_the_batch_and_the_other_decodes_on(served_model, count_rows):
    """A request whose client hangs up mid-batch stops costing compute: its row leaves the
    batch at the next step, and the other request's answer is what it is alone."""
    model, tok = load_model_dir(served_model)
    engine = Engine(model, tok, max_batch=8)
    engine.close()  # _decode is called here, on this thread
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("The capital", "A river")]
    events: dict[int, list] = {0: [], 1: []}

    def emit(i: int, request_box: list):
        def record(event):
            events[i].append(event)
            if i == 0 and len(events[0]) == 2:  # the first client hangs up after two deltas
                request_box[0].cancelled.set()

        return record

    requests = []
    for i, prompt in enumerate(prompts):
        box: list = []
        box.append(Request(prompt, 1, 16, Sampling(temperature=0.0), emit(i, box)))
        requests.append(box[0])
    with count_rows(model) as rows_per_call:
        engine._decode(requests)
    alone = generate(model, [prompts[1]], 16, temperature=0.0, stop_ids=engine.stop_ids)[0]
    (end,) = [e for e in events[1] if e.finish_reason]
    assert end.text == tok.decode(alone, skip_special=True)
    assert not any(e.finish_reason for e in events[0]) and len(events[0]) == 2
    # both rows until the step in which the first client hung up, then the other alone, to
    # its end (its stop token, or its 16th token)
    both = rows_per_call.count(2)
    assert 2 <= both < len(rows_per_call) - 4
    assert rows_per_call == [2] * both + [1] * (len(rows_per_call) - both)
    assert len(rows_per_call) == min(len(alone) + 1, 16)


# ---- the web app's API ------------------------------------------------------------------------
def test_respond_streams_answers_and_stores_them(server):
    messages = [{"role": "user", "content": "<b>bold</b> & <script>alert(1)</script>"}]
    events = respond(server, messages=messages, n=3, temperature=0.7)
    assert events[0]["type"] == "prompt" and events[-1] == {"type": "done"}
    ends = {e["index"]: e for e in events if e["type"] == "response"}
    assert sorted(ends) == [0, 1, 2]
    for i, end in ends.items():
        deltas = "".join(e["text"] for e in events if e["type"] == "delta" and e["index"] == i)
        assert deltas == end["text"] or "\ufffd" in end["text"]
    prompt = [r for r in rows(server.db, "prompts") if r["id"] == events[0]["prompt_id"]][0]
    assert json.loads(prompt["messages"]) == messages  # HTML is stored as the text it is
    stored = {r["id"]: r for r in rows(server.db, "responses")}
    for end in ends.values():
        row = stored[end["response_id"]]
        assert (row["text"], row["finish_reason"]) == (end["text"], end["finish_reason"])
        assert re.fullmatch("served@[0-9a-f]{12}", row["model_id"])  # name @ weights' sha256
        assert row["prompt_id"] == prompt["id"]
        sampling = json.loads(row["sampling"])
        assert sampling["temperature"] == 0.7 and sampling["max_tokens"] == 8

    # regenerate: one more answer to the same prompt, in the same conversation
    more = respond(server, prompt_id=prompt["id"], n=1)
    assert more[0] == {
        "type": "prompt",
        "prompt_id": prompt["id"],
        "conversation_id": prompt["conversation_id"],
    }
    answers = [r for r in rows(server.db, "responses") if r["prompt_id"] == prompt["id"]]
    assert len(answers) == 4


def test_judgements_pair_ranking_idempotent_and_listed(server):
    events = respond(server, messages=[{"role": "user", "content": "Rank these"}], n=3)
    ids = [e["response_id"] for e in events if e["type"] == "response"]
    before = counts(server.db)
    r = judge(
        server,
        kind="pair",
        response_ids=ids[:2],
        choice="b",
        source="side_by_side",
        request_id="r-1",
    )
    assert r.status_code == 200 and r.json()["duplicate"] is False
    again = judge(
        server,
        kind="pair",
        response_ids=ids[:2],
        choice="b",
        source="side_by_side",
        request_id="r-1",
    )
    assert again.json() == {"id": r.json()["id"], "duplicate": True}
    changed = judge(server, kind="pair", response_ids=ids[:2], choice="a", request_id="r-1")
    assert changed.status_code == 409 and "request_id" in changed.json()["error"]["message"]
    ranking = judge(server, kind="ranking", response_ids=[ids[2], ids[0], ids[1]], source="ranking")
    tie = judge(server, kind="pair", response_ids=[ids[1], ids[2]], choice="tie", annotator="bob")
    assert ranking.status_code == tie.status_code == 200
    assert counts(server.db)["judgements"] == before["judgements"] + 3
    stored = {row["id"]: row for row in rows(server.db, "judgements")}
    row = stored[ranking.json()["id"]]
    assert json.loads(row["response_ids"]) == [ids[2], ids[0], ids[1]] and row["choice"] is None
    row = stored[r.json()["id"]]
    assert (row["choice"], row["source"], row["annotator"]) == ("b", "side_by_side", "ann")

    listed = httpx.get(server.url + "/api/judgements", params={"limit": 2}).json()
    assert listed["counts"]["tie"] >= 1 and listed["counts"]["by_annotator"]["bob"] >= 1
    assert listed["counts"]["total"] == len(stored)
    assert [j["id"] for j in listed["judgements"]] == [tie.json()["id"], ranking.json()["id"]]
    assert listed["judgements"][1]["prompt"] == "Rank these"
    assert [x["id"] for x in listed["judgements"][1]["responses"]] == [ids[2], ids[0], ids[1]]


@pytest.mark.parametrize(
    "path, body, status, says",
    [
        ("/api/judgements", b'{"kind": "pair", "response_ids": [1, ', 400, "malformed JSON"),
        ("/api/respond", b"not json", 400, "malformed JSON"),
        (
            "/api/judgements",
            {"kind": "pair", "response_ids": [1, 999999], "choice": "a"},
            404,
            "999999",
        ),
        (
            "/api/judgements",
            {"kind": "pair", "response_ids": [1, 1], "choice": "a"},
            422,
            "distinct",
        ),
        ("/api/judgements", {"kind": "pair", "response_ids": [1, 2]}, 422, "choice"),
        ("/api/judgements", {"kind": "vote", "response_ids": [1, 2]}, 422, "kind"),
        (
            "/api/judgements",
            {"kind": "pair", "response_ids": [1, 2], "choice": "a", "annotator": "  "},
            422,
            "annotator",
        ),
        (
            "/api/judgements",
            {"kind": "pair", "response_ids": [1, 2], "choice": "a", "extra": 1},
            422,
            "extra",
        ),
        ("/api/respond", {"prompt_id": 999999}, 404, "prompt_id 999999"),
        (
            "/api/respond",
            {"messages": [{"role": "user", "content": "hi"}], "conversation_id": 999999},
            404,
            "conversation_id",
        ),
        (
            "/api/respond",
            {"messages": [{"role": "user", "content": "word " * 400}]},
            400,
            "the prompt is",
        ),
        (
            "/api/respond",
            {"messages": [{"role": "assistant", "content": "hi"}]},
            422,
            "user's turn",
        ),
        ("/api/respond", {"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n=99"),
        (
            "/api/respond",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
            400,
            "max_tokens",
        ),
        (
            "/api/respond",
            {"messages": [{"role": "user", "content": "x" * 300_000}]},
            413,
            "request body over",
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "'nope'",
        ),
        ("/v1/chat/completions", {"model": "served", "messages": []}, 422, "messages"),
        ("/api/respond", {"prompt_id": 2**70}, 422, "prompt_id"),
        (
            "/api/judgements",
            {"kind": "pair", "response_ids": [1, 2**70], "choice": "a"},
            422,
            "response_ids",
        ),
        (
            "/api/respond",
            b'{"messages": [{"role": "user", "content": "\\ud800"}], "annotator": "a"}',
            422,
            "surrogate",
        ),
        ("/v1/completions", {"model": "served", "prompt": "x", "seed": 2**70}, 422, "seed"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_stores_nothing(server, path, body, status, says):
    before = counts(server.db)
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        body = (
            {"annotator": "ann"} | body
            if path.startswith("/api") and "annotator" not in body
            else body
        )
        r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"]
    assert counts(server.db) == before


# ---- the OpenAI API, with the official client ---------------------------------------------------
def test_official_openai_client(server, served_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["served"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(
        model="served", messages=messages, max_tokens=10, temperature=0
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 10 and whole.choices[0].finish_reason in (
        "stop",
        "length",
    )
    model, tok = load_model_dir(served_model)
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    want = generate(
        model, [prompt], 10, temperature=0.0, stop_ids=[tok.end_id, tok.eos_id], pad_id=tok.pad_id
    )
    assert text == tok.decode(
        want[0], skip_special=True
    )  # the served model's greedy answer, token for token
    stopped = whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(want[0]) + stopped  # the same tokens, counted
    assert whole.usage.prompt_tokens == len(prompt)

    stream = client.chat.completions.create(
        model="served", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text or "\ufffd" in text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    several = client.chat.completions.create(
        model="served", messages=messages, max_tokens=6, n=3, seed=1
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    completion = client.completions.create(
        model="served", prompt="The capital of", max_tokens=5, temperature=0
    )
    want = generate(
        model,
        [[tok.bos_id, *tok.encode("The capital of")]],
        5,
        temperature=0.0,
        stop_ids=[tok.end_id, tok.eos_id],
        pad_id=tok.pad_id,
    )
    assert completion.choices[0].text == tok.decode(want[0], skip_special=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_concurrent_api_requests_share_batches(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": "served", "prompt": "Once", "max_tokens": 24, "temperature": 0}
            return await asyncio.gather(
                *(http.post(server.url + "/v1/completions", json=body) for _ in range(8))
            )

    before = httpx.get(server.url + "/api/stats").json()
    answers = asyncio.run(burst())
    after = httpx.get(server.url + "/api/stats").json()
    assert {r.status_code for r in answers} == {200}
    assert len({r.json()["choices"][0]["text"] for r in answers}) == 1  # greedy: all the same
    assert after["rows"] - before["rows"] == 8
    assert after["batches"] - before["batches"] < 8  # some of the 8 were decoded together


# ---- access tokens ---------------------------------------------------------------------------
def test_token_is_required_when_set_and_beyond_loopback(served_model, tmp_path):
    with start_server(served_model, tmp_path / "fb.sqlite3", "s3cret") as s:
        config = httpx.get(s.url + "/api/config").json()
        assert config["auth_required"] is True and config["model"] == "served"
        for path in ("/api/judgements", "/v1/models"):
            missing = httpx.get(s.url + path)
            assert missing.status_code == 401 and "token" in missing.json()["error"]["message"]
            wrong = httpx.get(s.url + path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert httpx.get(s.url + path, headers=s.headers()).status_code == 200
        r = httpx.post(
            s.url + "/api/respond",
            json={"messages": [{"role": "user", "content": "hi"}], "annotator": "a"},
        )
        assert r.status_code == 401 and counts(s.db)["prompts"] == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(served_model),
            "--host",
            "0.0.0.0",
            "--db",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "LMFORGE_TOKEN"},
    )
    assert proc.returncode == 2 and "token" in proc.stderr
    assert not (tmp_path / "x.db").exists()


# ---- export into the reward model -------------------------------------------------------------
def test_export_trains_a_reward_model(served_model, tmp_path):
    db = tmp_path / "fb.sqlite3"
    with start_server(served_model, db) as s:
        for n, text in enumerate(("Name a sea.", "Name a river.", "Name a city.", "Name a hill.")):
            ids = [
                e["response_id"]
                for e in respond(s, messages=[{"role": "user", "content": text}], n=3)
                if e["type"] == "response"
            ]
            assert (
                judge(s, kind="pair", response_ids=ids[:2], choice="ab"[n % 2]).status_code == 200
            )
            assert judge(s, kind="ranking", response_ids=ids[::-1]).status_code == 200
        assert judge(s, kind="pair", response_ids=ids[1:], choice="tie").status_code == 200
    out = tmp_path / "export"
    proc = lmforge("feedback", "export", "--db", db, "--out", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["judgements"], summary["pairs"], summary["rankings"]) == (9, 4, 4)
    assert (summary["ties_left_out"], summary["kto_dropped_middle"]) == (1, 4)  # K=3: 1 middle
    pairs, report = read_pairs(out / "comparisons.jsonl")
    assert report["records"] == 8 and len(pairs) == 4 + 4 * 3 - report["dropped_identical"]
    labels, _ = read_labelled(out / "kto.jsonl")
    assert len(labels) == summary["kto_labels"] == 4 * 2 + 4 * 2 - 2 * report["dropped_identical"]
    first = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    stored = {r["id"]: r["text"] for r in rows(db, "responses")}
    judgement = rows(db, "judgements")[0]
    a, b = json.loads(judgement["response_ids"])
    assert (first["chosen"], first["rejected"]) == (stored[a], stored[b])
    assert first["messages"] == [{"role": "user", "content": "Name a sea."}]

    rm = train_rm_on_feedback(out, served_model, tmp_path / "run")
    assert rm["data_records"] == 8 and rm["train_pairs"] + rm["eval_pairs"] == len(pairs)


def test_export_of_a_missing_database_names_it(tmp_path):
    proc = lmforge("feedback", "export", "--db", tmp_path / "none.sqlite3", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "none.sqlite3" in proc.stderr


# ---- load, and SIGKILL -------------------------------------------------------------------------
def test_no_acknowledged_judgement_is_lost_under_load_or_sigkill(served_model, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_feedback import run

    result = run(served_model, clients=32, seconds=4.0, workdir=tmp_path)
    assert result["steady"]["acknowledged"] > 100 and result["sigkill"]["acknowledged"] > 50
    assert result["sigkill"]["retries_after_no_answer"] > 0  # the kill did cut requests off
    assert result["check"] == result["check"] | {
        "acknowledged_missing": 0,
        "stored_twice": 0,
        "acknowledged_twice": 0,
        "stored_never_sent": 0,
    }
    acked = result["steady"]["acknowledged"] + result["sigkill"]["acknowledged"]
    assert acked <= result["check"]["rows"] <= acked + 32  # at most one unanswered per client


def test_long_and_short_prompts_never_overflow_a_shared_batch(served_model):
    model, tok = load_model_dir(served_model)  # context 256
    engine = Engine(model, tok, max_batch=8)
    long_prompt = [tok.bos_id] + [tok.encode("a b")[0]] * 200
    results: dict[str, list] = {}
    jobs = {"long": (long_prompt, 50), "short": ([tok.bos_id, *tok.encode("hi")], 200)}
    threads = [
        threading.Thread(
            target=lambda k=k, p=p, m=m: results.__setitem__(k, run_engine(engine, p, 2, m))
        )
        for k, (p, m) in jobs.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for events in results.values():
        assert all(e.error is None for e in events)
        assert sum(e.finish_reason is not None for e in events) == 2
    assert engine.batches == 2  # 201 + 200 tokens do not fit 256: two batches
    engine.close()


def test_host_header_of_another_site_is_refused(server):
    r = httpx.get(server.url + "/api/judgements", headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert httpx.get(server.url + "/api/judgements").status_code == 200


def test_a_streamed_line_survives_every_unicode_line_break():
    # A random model samples U+2028 or U+0085 now and then; a client splitting the
    # stream with str.splitlines (httpx) must still see one JSON document a line.
    from lmforge.serve.app import _line, _sse

    text = "a\u2028b\u2029c\x85d\x1ce\x0bf\r\n\u4e2d"
    assert json.loads(_line(type="delta", text=text).splitlines()[0])["text"] == text
    event = _sse({"text": text}).splitlines()
    assert len(event) == 2 and json.loads(event[0].removeprefix("data: "))["text"] == text


def test_stream_usage_and_a_client_that_hangs_up_leaves_no_prompt(server):
    # seeded: unseeded, the random model samples its end token first now and then (0 tokens)
    body = {"model": "served", "prompt": "Once", "max_tokens": 12, "stream": True, "seed": 1}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    before = counts(server.db)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    request = {"messages": messages, "n": 8, "max_tokens": 240, "annotator": "ann"}
    with httpx.stream("POST", server.url + "/api/respond", json=request, timeout=60) as r:
        first = json.loads(next(r.iter_lines()))
    assert first["type"] == "prompt"  # the prompt was stored, then the client left
    for _ in range(50):
        if counts(server.db) == before:
            break
        time.sleep(0.1)
    assert counts(server.db) == before


def test_serves_a_hugging_face_export_like_the_model_it_came_from(served_model, tmp_path):
    from lmforge.model.hf import export_hf

    export_hf(served_model, tmp_path / "hf")
    body = {"prompt": "The capital of", "max_tokens": 8, "temperature": 0}
    texts = []
    for path, name in ((served_model, "served"), (tmp_path / "hf", "hf")):
        with start_server(path, tmp_path / f"{name}.sqlite3") as s:
            assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == name
            r = httpx.post(s.url + "/v1/completions", json=body | {"model": name}, timeout=60)
            texts.append((r.json()["choices"][0]["text"], r.json()["usage"]))
    assert texts[0] == texts[1]  # imported from the export: the same greedy tokens and text


def test_a_seed_reproduces_a_request_even_under_concurrency(served_model):
    model, tok = load_model_dir(served_model)
    engine = Engine(model, tok, max_batch=8)
    prompt = [tok.bos_id, *tok.encode("Once upon a time")]
    seeded = {"temperature": 1.0, "seed": 7}
    alone = run_engine(engine, prompt, 2, 16, sampling=seeded)
    # three seeded requests queue up behind a long one, then would share one batch
    events: list[list] = [[] for _ in range(4)]
    done = [threading.Event() for _ in range(4)]

    def emit(i: int, n: int):
        def put(event):
            events[i].append(event)
            if sum(e.finish_reason is not None for e in events[i]) == n:
                done[i].set()

        return put

    engine.submit(Request(prompt, 1, 200, Sampling(temperature=0.0), emit(0, 1)))
    for i in (1, 2, 3):
        engine.submit(Request(prompt, 2, 16, Sampling(**seeded), emit(i, 2)))
    assert all(d.wait(60) for d in done)

    def texts(got: list) -> list[str]:
        return [e.text for e in sorted(got, key=lambda e: e.index) if e.finish_reason]

    assert all(texts(events[i]) == texts(alone) for i in (1, 2, 3))  # same seed, same answers
    engine.close()
