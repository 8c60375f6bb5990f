"""The feedback web app of `lmforge serve` in a real browser (Playwright driving Debian's
Chromium, headless): chat with regenerate-and-judge, side by side, ranking, the judgements
page, HTML in messages, the access token, the README's screenshots, and judgements collected
through the page exported and trained on by the rm stage. Every UI action is checked in the
server's SQLite database."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no Chromium at /usr/bin/chromium")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need the playwright package"
)
expect = sync_api.expect

from conftest import lmforge, train_rm_on_feedback  # noqa: E402
from serving import Server, start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# without the background-networking flags Chromium keeps calling home on a closed network
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
# The README's screenshots (docs/screenshots/) come from a trained model, with
# LMFORGE_SCREENSHOT_MODEL=runs/x/sft; otherwise the tests save theirs in a temporary directory.
SCREENSHOT_MODEL = os.environ.get("LMFORGE_SCREENSHOT_MODEL")
SCREENSHOTS = REPO / "docs" / "screenshots" if SCREENSHOT_MODEL else None
# the random model often runs to the limit: keep its answers short
MAX_TOKENS = 48 if SCREENSHOT_MODEL else 16
WAIT_MS = 30_000  # a generous bound on one round of short answers on a busy 2-core machine
INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
ANNOTATOR_INJECTION = "<img src=x onerror=window.__pwned=1>"
TOKEN = "s3cret-token"
expect.set_options(timeout=WAIT_MS)


# ---- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("browser") / "feedback.sqlite3"
    with start_server(Path(SCREENSHOT_MODEL or served_model), db) as server:
        yield server


def new_page(browser):
    """A page in a fresh context (empty localStorage), failing on any script error."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.script_errors = []
    page.on("pageerror", lambda e: page.script_errors.append(str(e)))
    return context, page


@pytest.fixture
def page(browser):
    context, page = new_page(browser)
    yield page
    errors = page.script_errors
    context.close()
    assert errors == [], f"script errors on the page: {errors}"


def open_app(page, url: str, annotator: str = "alice") -> None:
    """The annotation page, its settings loaded, an annotator named and answers kept short."""
    page.goto(url + "/")
    expect(page.locator("#model-name")).not_to_have_text("…")
    page.fill("#annotator", annotator)
    page.fill("#max-tokens", str(MAX_TOKENS))


def settle(page) -> None:
    """Wait until the page's request (answers streaming, a judgement saving) has ended."""
    # (a locator, not wait_for_function: the server's CSP forbids the eval that needs)
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bbusy\b"))


def judge(page, action: Callable[[], None]) -> int:
    """Do `action` (a click or a key), wait for the page to confirm, return the judgement id."""
    status = page.locator("#status")
    before = status.text_content() if status.is_visible() else ""
    action()
    expect(status).to_have_text(re.compile(r"^saved judgement #\d+$"))
    expect(status).not_to_have_text(before)
    return int(status.text_content().rsplit("#", 1)[1])


def rows(db: Path, sql: str, *args) -> list[tuple]:
    with closing(sqlite3.connect(db)) as con:
        return con.execute(sql, args).fetchall()


def judgement(db: Path, jid: int) -> dict:
    (row,) = rows(
        db,
        "SELECT kind, source, prompt_id, response_ids, choice, annotator FROM judgements "
        "WHERE id = ?",
        jid,
    )
    keys = ("kind", "source", "prompt_id", "response_ids", "choice", "annotator")
    out = dict(zip(keys, row))
    out["response_ids"] = json.loads(out["response_ids"])
    return out


def response(db: Path, rid: int) -> tuple[int, str]:
    """(prompt id, text) of a stored response."""
    ((prompt_id, text),) = rows(db, "SELECT prompt_id, text FROM responses WHERE id = ?", rid)
    return prompt_id, text


def prompt(db: Path, pid: int) -> tuple[int, list[dict], str]:
    """(conversation id, messages, mode) of a stored prompt."""
    ((cid, messages, mode),) = rows(
        db, "SELECT conversation_id, messages, mode FROM prompts WHERE id = ?", pid
    )
    return cid, json.loads(messages), mode


def screenshot(page, name: str) -> Path:
    """Save a screenshot of a mode and check that it is a real 1280x800 PNG."""
    folder = SCREENSHOTS or Path(tempfile.gettempdir()) / "lmforge-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(data) > 20_000  # a rendered page, not a blank one (blank: ~5 kB)
    return path


def ask_side_by_side(page, text: str) -> tuple[int, int]:
    """Send a side-by-side prompt and wait for both answers; their response ids."""
    page.fill("#sbs-input", text)
    page.press("#sbs-input", "Enter")
    settle(page)
    expect(page.locator("#sbs-choose-b")).to_be_enabled()
    return tuple(int(page.get_attribute(f"#sbs-{x}", "data-response-id")) for x in "ab")


# ---- the three modes ----------------------------------------------------------------------
def test_chat_regenerate_judge_and_continue(page, server: Server):
    db = server.db
    open_app(page, server.url, "")
    expect(page.locator("#mode-chat")).to_have_class(re.compile(r"\bactive\b"))
    expect(page.locator("#regenerate")).to_be_disabled()
    page.fill("#chat-input", "Can you tell me the capital of Nabobis?")
    page.click("#chat-send")  # nobody named: refused before anything is sent
    expect(page.locator("#error")).to_contain_text("Annotator")
    assert rows(db, "SELECT COUNT(*) FROM prompts") == [(0,)]
    page.fill("#annotator", "alice")
    page.click("#chat-send")
    settle(page)
    answers = page.locator("#chat-log .msg.assistant")
    expect(answers).to_have_count(1)
    expect(page.locator("#chat-log .msg.user")).to_have_text(
        ["Can you tell me the capital of Nabobis?"]
    )
    first = int(answers.nth(0).get_attribute("data-response-id"))
    prompt_id, first_text = response(db, first)
    expect(answers.nth(0)).to_have_text(first_text)  # the streamed deltas add up to the answer
    conversation, messages, mode = prompt(db, prompt_id)
    assert (
        messages == [{"role": "user", "content": "Can you tell me the capital of Nabobis?"}]
        and mode == "chat"
    )
    assert rows(db, "SELECT annotator FROM conversations WHERE id = ?", conversation) == [
        ("alice",)
    ]
    sampling = json.loads(rows(db, "SELECT sampling FROM responses WHERE id = ?", first)[0][0])
    assert sampling["max_tokens"] == MAX_TOKENS  # the settings row reaches the server

    # regenerate: the previous and the new answer side by side, then judged better
    page.click("#regenerate")
    settle(page)
    expect(page.locator("#compare")).to_be_visible()
    expect(page.locator("#compare .answer.previous")).to_have_text(first_text)
    expect(page.locator("#judge-better")).to_be_enabled()
    new_text = page.locator("#compare .answer.new").text_content()
    # no new message while the judgement is pending
    prompts_before = rows(db, "SELECT COUNT(*) FROM prompts")
    page.fill("#chat-input", "too early")
    page.press("#chat-input", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("Judge the regenerated answer first")
    assert rows(db, "SELECT COUNT(*) FROM prompts") == prompts_before
    page.fill("#chat-input", "")

    jid = judge(page, lambda: page.click("#judge-better"))
    expect(page.locator("#compare")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()  # cleared by the next success
    j = judgement(db, jid)
    new = j["response_ids"][0]
    assert j == {
        "kind": "pair",
        "source": "regenerate",
        "prompt_id": prompt_id,
        "response_ids": [new, first],
        "choice": "a",
        "annotator": "alice",
    }
    assert new != first and response(db, new) == (prompt_id, new_text)
    expect(answers).to_have_count(1)
    expect(answers.nth(0)).to_have_text(new_text)  # the preferred answer stays

    # the conversation goes on from the preferred answer, sent with Enter
    page.fill("#chat-input", "Which river is the largest in Nabobis?")
    page.press("#chat-input", "Enter")
    settle(page)
    expect(answers).to_have_count(2)
    second = int(answers.nth(1).get_attribute("data-response-id"))
    second_prompt, second_text = response(db, second)
    assert prompt(db, second_prompt) == (
        conversation,
        [
            {"role": "user", "content": "Can you tell me the capital of Nabobis?"},
            {"role": "assistant", "content": new_text},
            {"role": "user", "content": "Which river is the largest in Nabobis?"},
        ],
        "chat",
    )

    # `r` (outside the text box) regenerates; judged worse, the earlier answer stays
    page.press("#chat-input", "Escape")
    page.keyboard.press("r")
    settle(page)
    expect(page.locator("#compare")).to_be_visible()
    expect(page.locator("#compare .answer.previous")).to_have_text(second_text)
    screenshot(page, "chat")
    jid = judge(page, lambda: page.click("#judge-worse"))
    j = judgement(db, jid)
    assert j["choice"] == "b" and j["response_ids"][1] == second
    assert response(db, j["response_ids"][0])[0] == second_prompt
    expect(answers.nth(1)).to_have_text(second_text)
    expect(page.locator("#compare")).to_be_hidden()
    page.reload()  # the annotator's name is remembered
    expect(page.locator("#annotator")).to_have_value("alice")


def test_side_by_side_choose_b_by_key(page, server: Server):
    db = server.db
    open_app(page, server.url, "bob")
    page.keyboard.press("Alt+2")
    expect(page.locator("#mode-sbs")).to_have_class(re.compile(r"\bactive\b"))
    expect(page.locator("#sbs")).to_be_visible()
    expect(page.locator("#chat")).to_be_hidden()
    a, b = ask_side_by_side(page, "How many people live in Garuba?")
    prompt_id, text_a = response(db, a)
    assert response(db, b)[0] == prompt_id and a != b
    expect(page.locator("#sbs-a")).to_have_text(text_a)
    expect(page.locator("#sbs-b")).to_have_text(response(db, b)[1])
    _, messages, mode = prompt(db, prompt_id)
    assert messages == [{"role": "user", "content": "How many people live in Garuba?"}]
    assert mode == "side_by_side"
    screenshot(page, "side_by_side")

    jid = judge(page, lambda: page.keyboard.press("2"))
    assert judgement(db, jid) == {
        "kind": "pair",
        "source": "side_by_side",
        "prompt_id": prompt_id,
        "response_ids": [a, b],
        "choice": "b",
        "annotator": "bob",
    }
    expect(page.locator("#sbs-b")).to_have_class(re.compile(r"\bwon\b"))
    expect(page.locator("#sbs-choose-a")).to_be_disabled()  # one judgement per pair
    # each side-by-side prompt starts a conversation of its own
    a2, _ = ask_side_by_side(page, "And the shortest?")
    first_conversation = prompt(db, prompt_id)[0]
    assert prompt(db, response(db, a2)[0])[0] != first_conversation


def test_ranking_k3_click_keys_undo_submit(page, server: Server):
    db = server.db
    open_app(page, server.url, "carol")
    page.click("#mode-rank")
    expect(page.locator("#mode-rank")).to_have_class(re.compile(r"\bactive\b"))
    page.fill("#rank-k", "3")
    page.fill("#rank-input", "When was Nabobis founded?")
    page.click("#rank-send")
    settle(page)
    cards = page.locator("#rank-answers .rank-answer")
    expect(cards).to_have_count(3)
    ids = [int(cards.nth(i).get_attribute("data-response-id")) for i in range(3)]
    prompt_id = response(db, ids[0])[0]
    stored = rows(db, "SELECT id, text FROM responses WHERE prompt_id = ? ORDER BY id", prompt_id)
    assert sorted(ids) == [i for i, _ in stored]
    texts = dict(stored)
    for i in range(3):
        expect(cards.nth(i).locator(".rank-text")).to_have_text(texts[ids[i]])
        expect(cards.nth(i).locator(".rank-num")).to_have_text(str(i + 1))
    assert prompt(db, prompt_id)[1:] == (
        [{"role": "user", "content": "When was Nabobis founded?"}],
        "ranking",
    )
    expect(page.locator("#rank-submit")).to_be_disabled()

    cards.nth(2).click()  # answer 3 first
    page.keyboard.press("2")
    page.keyboard.press("Backspace")  # undo answer 2
    page.keyboard.press("1")
    expect(page.locator("#rank-submit")).to_be_disabled()  # one still unplaced
    page.keyboard.press("2")
    expect(page.locator("#rank-order li")).to_have_text(
        ["1st: answer 3", "2nd: answer 1", "3rd: answer 2"]
    )
    expect(cards.locator(".rank-place")).to_have_text(["2nd", "3rd", "1st"])
    expect(page.locator("#rank-submit")).to_be_enabled()
    screenshot(page, "ranking")

    jid = judge(page, lambda: page.keyboard.press("Enter"))
    assert judgement(db, jid) == {
        "kind": "ranking",
        "source": "ranking",
        "prompt_id": prompt_id,
        "response_ids": [ids[2], ids[0], ids[1]],
        "choice": None,
        "annotator": "carol",
    }
    expect(page.locator("#rank-submit")).to_be_disabled()  # submitted once


# ---- the judgements page --------------------------------------------------------------------
def test_judgements_page_lists_and_counts(page, server: Server):
    db = server.db
    open_app(page, server.url, "dora")
    page.keyboard.press("Alt+2")
    a, b = ask_side_by_side(page, "Say something kind.")
    jid = judge(page, lambda: page.click("#sbs-tie"))
    page.click("#judgements-link")
    expect(page).to_have_url(server.url + "/judgements")
    expect(page.locator("tr.judgement").first).to_have_attribute("data-id", str(jid))

    def count(where: str = "1") -> str:
        return str(rows(db, f"SELECT COUNT(*) FROM judgements WHERE {where}")[0][0])

    expect(page.locator("#count-total")).to_have_text(count())
    expect(page.locator("#count-pair")).to_have_text(count("kind = 'pair'"))
    expect(page.locator("#count-ranking")).to_have_text(count("kind = 'ranking'"))
    expect(page.locator("#count-tie")).to_have_text(count("choice = 'tie'"))
    assert int(count("choice = 'tie'")) >= 1
    expect(page.locator("#count-annotators")).to_contain_text("dora: 1")
    side_by_side = count("source = 'side_by_side'")
    expect(page.locator("#count-sources")).to_contain_text(f"side_by_side: {side_by_side}")
    # one row per judgement, newest first
    ids = [str(i) for (i,) in rows(db, "SELECT id FROM judgements ORDER BY id DESC")]
    expect(page.locator("tr.judgement")).to_have_count(len(ids))
    expect(page.locator("tr.judgement td.id")).to_have_text(ids)
    row = page.locator("tr.judgement").first
    expect(row.locator("td.kind")).to_have_text("pair")
    expect(row.locator("td.source")).to_have_text("side_by_side")
    expect(row.locator("td.annotator")).to_have_text("dora")
    expect(row.locator("td.prompt")).to_have_text("Say something kind.")
    expect(row.locator("td.choice")).to_have_text("tie")
    expect(row.locator(".answers li")).to_have_count(2)
    for i, rid in enumerate((a, b)):
        item = row.locator(".answers li").nth(i)
        expect(item).to_have_attribute("data-response-id", str(rid))
        expect(item).to_contain_text(response(db, rid)[1])
    # a ranking's answers in its order, the best marked, if an earlier test left one
    ranking = rows(db, "SELECT id, response_ids FROM judgements WHERE kind = 'ranking' LIMIT 1")
    for rid, response_ids in ranking:
        ranked = page.locator(f"tr.judgement[data-id='{rid}'] .answers li")
        expect(ranked).to_have_count(len(json.loads(response_ids)))
        expect(ranked.first).to_have_class("won")
        expect(ranked.locator(".tag")).to_have_text(["1st", "2nd", "3rd"][: ranked.count()])
    screenshot(page, "judgements")


# ---- safety -----------------------------------------------------------------------------------
def test_html_in_messages_stays_text(page, server: Server):
    """HTML typed by a user (or written by the model) is shown as text: no element is made
    of it, so no handler runs (the server's CSP would block inline scripts too; this checks the
    page does not depend on that)."""
    db = server.db
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    open_app(page, server.url, ANNOTATOR_INJECTION)
    page.fill("#chat-input", INJECTION)
    page.click("#chat-send")
    settle(page)
    expect(page.locator("#chat-log .msg.user")).to_have_text([INJECTION])
    expect(page.locator("#chat-log img, #chat-log script")).to_have_count(0)
    page.click("#regenerate")
    settle(page)
    expect(page.locator("#compare img, #compare script")).to_have_count(0)
    jid = judge(page, lambda: page.keyboard.press("3"))
    j = judgement(db, jid)
    assert j["choice"] == "tie" and j["annotator"] == ANNOTATOR_INJECTION
    assert prompt(db, j["prompt_id"])[1] == [{"role": "user", "content": INJECTION}]
    assert page.evaluate("typeof window.__pwned") == "undefined"

    page.goto(server.url + "/judgements")
    row = page.locator(f"tr.judgement[data-id='{jid}']")
    expect(row.locator("td.prompt")).to_have_text(INJECTION)
    expect(row.locator("td.annotator")).to_have_text(ANNOTATOR_INJECTION)
    expect(page.locator("#count-annotators")).to_contain_text(ANNOTATOR_INJECTION)
    expect(page.locator("main img, main script")).to_have_count(0)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # an <img src=x> made from the text would have fetched /x
    assert not [u for u in requested if u.split("?")[0].endswith("/x")]


def test_access_token(browser, served_model, tmp_path):
    db = tmp_path / "auth.sqlite3"
    with start_server(served_model, db, token=TOKEN) as server:
        context, page = new_page(browser)
        open_app(page, server.url, "erin")
        expect(page.locator("#token-input")).to_be_visible()
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).not_to_have_text("")
        # without the token the server refuses: nothing is stored, the message comes back
        page.fill("#chat-input", "hi")
        page.click("#chat-send")
        settle(page)
        expect(page.locator("#error")).to_contain_text("token")
        expect(page.locator("#chat-log .msg")).to_have_count(0)
        expect(page.locator("#chat-input")).to_have_value("hi")
        assert rows(db, "SELECT COUNT(*) FROM prompts") == [(0,)]
        # a wrong token is refused and the box stays
        page.fill("#token-input", "wrong")
        page.click("#token-save")
        expect(page.locator("#error")).to_contain_text("token")
        expect(page.locator("#token-input")).to_be_visible()
        # the right one: chatting works
        page.fill("#token-input", TOKEN)
        page.press("#token-input", "Enter")
        expect(page.locator("#token-input")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        page.click("#chat-send")
        settle(page)
        answer = page.locator("#chat-log .msg.assistant")
        expect(answer).to_have_count(1)
        rid = int(answer.get_attribute("data-response-id"))
        expect(answer).to_have_text(response(db, rid)[1])
        assert page.evaluate("localStorage.getItem('lmforge.token')") == TOKEN
        assert page.script_errors == []
        context.close()

        # a token in the address is taken, kept, and removed from the address bar
        context, page = new_page(browser)
        page.goto(f"{server.url}/judgements#token={TOKEN}")
        expect(page.locator("#count-total")).to_have_text("0")
        expect(page.locator("#token-input")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        assert page.url == server.url + "/judgements"
        assert page.evaluate("localStorage.getItem('lmforge.token')") == TOKEN
        assert page.script_errors == []
        context.close()


# ---- the loop: judgements in the page, a reward model trained on them ------------------------
def test_judgements_export_and_train_reward_model(browser, served_model, tmp_path):
    db = tmp_path / "loop.sqlite3"
    with start_server(served_model, db) as server:
        context, page = new_page(browser)
        open_app(page, server.url, "frank")
        page.keyboard.press("Alt+2")
        for i, key in enumerate("121"):  # three pairs, A, B, A preferred
            ask_side_by_side(page, f"Question number {i}?")
            judge(page, lambda key=key: page.keyboard.press(key))
        page.keyboard.press("Alt+3")
        page.fill("#rank-k", "3")
        page.fill("#rank-input", "Rank these.")
        page.press("#rank-input", "Enter")
        settle(page)
        for key in "312":
            page.keyboard.press(key)
        judge(page, lambda: page.keyboard.press("Enter"))
        assert page.script_errors == []
        context.close()
    assert rows(db, "SELECT kind, COUNT(*) FROM judgements GROUP BY kind ORDER BY kind") == [
        ("pair", 3),
        ("ranking", 1),
    ]

    out = tmp_path / "feedback"
    done = lmforge("feedback", "export", "--db", db, "--out", out)
    assert done.returncode == 0, done.stderr
    for name in ("pairs", "rankings", "kto", "comparisons"):
        assert (out / f"{name}.jsonl").is_file()
    comparisons = [json.loads(line) for line in (out / "comparisons.jsonl").open()]
    assert len(comparisons) == 4
    assert sum("ranking" in c for c in comparisons) == 1
    exported = json.loads((out / "summary.json").read_text())
    assert (exported["judgements"], exported["pairs"], exported["rankings"]) == (4, 3, 1)
    # each pair's chosen text is the answer picked in the page (keys 1, 2, 1: A, B, A)
    chosen = [json.loads(line)["chosen"] for line in (out / "pairs.jsonl").open()]
    picked = [
        response(db, json.loads(ids)[0 if choice == "a" else 1])[1]
        for ids, choice in rows(db, "SELECT response_ids, choice FROM judgements ORDER BY id")
        if choice is not None
    ]
    assert [c for (c,) in rows(db, "SELECT choice FROM judgements ORDER BY id")] == [
        "a",
        "b",
        "a",
        None,
    ]
    assert chosen == picked

    summary = train_rm_on_feedback(out, served_model, tmp_path / "run")
    # 3 pairs and a ranking of 3 (3 pairs): 6 comparisons, less any of identical answers
    assert summary["data_records"] == 4
    assert summary["data_pairs"] + summary["data_dropped_identical"] == 6
    # one prompt's comparisons are held out for evaluation, the rest trained on
    assert summary["train_pairs"] + summary["eval_pairs"] == summary["data_pairs"]
    assert summary["train_prompts"] == 3 and summary["train_pairs"] >= 1
