"""Human feedback in SQLite: conversations, the prompts answered in them, the responses
sampled (with the model and sampling settings), and the judgements people made of them.

The database runs in WAL mode with synchronous=FULL, and every write is one transaction:
a judgement is acknowledged only after its commit reached the disk, so killing the server
(even SIGKILL, even mid-write) loses nothing that was acknowledged. A judgement may carry a
client `request_id`; a retry with the same id returns the first judgement instead of storing
a second (exactly once). `export_feedback` turns judgements into the comparison files that
`lmforge rm`, `dpo` and `kto` read.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from lmforge.data.preferences import read_labelled
from lmforge.io import write_json_atomic, write_jsonl_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    annotator TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    messages TEXT NOT NULL,  -- JSON [{role, content}, ...] ending with the user turn
    mode TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    model_id TEXT NOT NULL,
    sampling TEXT NOT NULL,  -- JSON {temperature, top_p, top_k, max_tokens, seed}
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'ranking')),
    source TEXT NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response_ids TEXT NOT NULL,  -- JSON: a pair [a, b]; a ranking best first
    choice TEXT CHECK (choice IN ('a', 'b', 'tie')),  -- pairs only
    annotator TEXT NOT NULL,
    request_id TEXT UNIQUE,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_prompt ON responses(prompt_id);
CREATE INDEX IF NOT EXISTS prompts_by_conversation ON prompts(conversation_id);
"""


class NotFound(LookupError):
    """An id that names no row; the server answers 404."""


class Conflict(ValueError):
    """A request the stored rows contradict; the server answers 409."""


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no feedback database here")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
    db.execute("PRAGMA foreign_keys=ON")
    db.row_factory = sqlite3.Row
    return db


class FeedbackStore:
    """One connection shared by the server's threads; a lock serialises them (SQLite has a
    single writer anyway)."""

    def __init__(self, path: Path):
        self.path = path
        self._db = connect(path)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
            return result

    def add_prompt(
        self, conversation_id: int | None, annotator: str, messages: list[dict], mode: str
    ) -> tuple[int, int]:
        """(prompt id, conversation id); a new conversation when conversation_id is None."""

        def work(db: sqlite3.Connection) -> tuple[int, int]:
            now = time.time()
            cid = conversation_id
            if cid is None:
                cid = db.execute(
                    "INSERT INTO conversations (created_at, annotator) VALUES (?, ?)",
                    (now, annotator),
                ).lastrowid
            elif db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                raise NotFound(f"conversation_id {cid}: no such conversation")
            pid = db.execute(
                "INSERT INTO prompts (conversation_id, messages, mode, created_at) "
                "VALUES (?, ?, ?, ?)",
                (cid, json.dumps(messages, ensure_ascii=False), mode, now),
            ).lastrowid
            return pid, cid

        return self._write(work)

    def discard_prompt(self, prompt_id: int) -> None:
        """Remove a prompt that got no response (generation failed, or the client left), and
        its conversation if nothing else is in it."""

        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM responses WHERE prompt_id = ?", (prompt_id,)).fetchone():
                return
            (cid,) = db.execute(
                "SELECT conversation_id FROM prompts WHERE id = ?", (prompt_id,)
            ).fetchone()
            db.execute("DELETE FROM prompts WHERE id = ?", (prompt_id,))
            if not db.execute("SELECT 1 FROM prompts WHERE conversation_id = ?", (cid,)).fetchone():
                db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

        self._write(work)

    def prompt(self, prompt_id: int) -> tuple[int, list[dict]]:
        """(conversation id, messages) of a stored prompt."""
        with self._lock:
            row = self._db.execute(
                "SELECT conversation_id, messages FROM prompts WHERE id = ?", (prompt_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"prompt_id {prompt_id}: no such prompt")
        return row["conversation_id"], json.loads(row["messages"])

    def add_response(
        self, prompt_id: int, text: str, finish_reason: str, model_id: str, sampling: dict
    ) -> int:
        return self._write(
            lambda db: (
                db.execute(
                    "INSERT INTO responses (prompt_id, text, finish_reason, model_id, sampling, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (prompt_id, text, finish_reason, model_id, json.dumps(sampling), time.time()),
                ).lastrowid
            )
        )

    def add_judgement(
        self,
        kind: str,
        source: str,
        response_ids: list[int],
        choice: str | None,
        annotator: str,
        request_id: str | None,
    ) -> tuple[int, bool]:
        """(judgement id, whether request_id had been stored before). The responses must
        exist, be distinct, and answer one prompt."""

        def work(db: sqlite3.Connection) -> tuple[int, bool]:
            if request_id is not None:
                old = db.execute(
                    "SELECT id, kind, response_ids, choice FROM judgements WHERE request_id = ?",
                    (request_id,),
                ).fetchone()
                if old is not None:
                    if (old["kind"], json.loads(old["response_ids"]), old["choice"]) != (
                        kind,
                        response_ids,
                        choice,
                    ):
                        raise Conflict(
                            f"request_id {request_id!r} was already used for judgement "
                            f"{old['id']}, with other contents"
                        )
                    return old["id"], True
            marks = ",".join("?" * len(response_ids))
            found = dict(
                db.execute(
                    f"SELECT id, prompt_id FROM responses WHERE id IN ({marks})", response_ids
                ).fetchall()
            )
            missing = [i for i in response_ids if i not in found]
            if missing:
                raise NotFound(f"response_ids {missing}: no such response")
            if len(set(found.values())) != 1:
                raise Conflict(f"response_ids {response_ids} answer different prompts")
            jid = db.execute(
                "INSERT INTO judgements (kind, source, prompt_id, response_ids, choice, "
                "annotator, request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    source,
                    found[response_ids[0]],
                    json.dumps(response_ids),
                    choice,
                    annotator,
                    request_id,
                    time.time(),
                ),
            ).lastrowid
            return jid, False

        return self._write(work)

    def judgements(self, limit: int) -> dict:
        """Counts over every judgement, and the newest `limit` with their prompt and texts."""
        with self._lock:
            db = self._db
            total, pair, ranking, tie = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(kind = 'pair'), 0), "
                "COALESCE(SUM(kind = 'ranking'), 0), COALESCE(SUM(choice = 'tie'), 0) "
                "FROM judgements"
            ).fetchone()
            counts = {
                "total": total,
                "pair": pair,
                "ranking": ranking,
                "tie": tie,
                "by_annotator": dict(
                    db.execute("SELECT annotator, COUNT(*) FROM judgements GROUP BY annotator")
                ),
                "by_source": dict(
                    db.execute("SELECT source, COUNT(*) FROM judgements GROUP BY source")
                ),
            }
            rows = db.execute(
                "SELECT j.*, p.messages FROM judgements j JOIN prompts p ON p.id = j.prompt_id "
                "ORDER BY j.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            texts = _response_texts(db, [i for r in rows for i in json.loads(r["response_ids"])])
        listed = []
        for r in rows:
            ids = json.loads(r["response_ids"])
            listed.append(
                {
                    "id": r["id"],
                    "kind": r["kind"],
                    "source": r["source"],
                    "annotator": r["annotator"],
                    "created_at": r["created_at"],
                    "prompt": json.loads(r["messages"])[-1]["content"],
                    "responses": [{"id": i, "text": texts[i]} for i in ids],
                    "choice": r["choice"],
                }
            )
        return {"counts": counts, "judgements": listed}


def _response_texts(db: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    if not ids:
        return {}
    marks = ",".join("?" * len(set(ids)))
    return dict(db.execute(f"SELECT id, text FROM responses WHERE id IN ({marks})", list(set(ids))))


def export_feedback(db_path: Path, out_dir: Path) -> dict:
    """Write the judgements as training data, in the formats `lmforge rm/dpo/kto` read:

    - `pairs.jsonl`: {"messages", "chosen", "rejected", ...} per pair judgement (ties left out);
    - `rankings.jsonl`: {"messages", "responses", "ranking"} per ranking (best first);
    - `comparisons.jsonl`: both together (for `rm.data` / `dpo.data`);
    - `kto.jsonl`: {"messages", "completion", "label"}, labelled as the kto stage labels
      comparisons (a pair's chosen true and rejected false; a ranking's top half true and
      bottom half false);
    - `summary.json`: the counts.
    Each record keeps its judgement id and annotator, so a row can be traced back."""
    db = connect(db_path, read_only=True)
    try:
        db.execute("BEGIN")  # one snapshot, even while the server writes
        rows = db.execute(
            "SELECT j.*, p.messages FROM judgements j JOIN prompts p ON p.id = j.prompt_id "
            "ORDER BY j.id"
        ).fetchall()
        texts = _response_texts(db, [i for r in rows for i in json.loads(r["response_ids"])])
        db.execute("COMMIT")
    finally:
        db.close()
    pairs, rankings, ties = [], [], 0
    for r in rows:
        ids = json.loads(r["response_ids"])
        trace = {"judgement_id": r["id"], "annotator": r["annotator"], "source": r["source"]}
        messages = json.loads(r["messages"])
        if r["kind"] == "ranking":
            shown = sorted(ids)  # the order they were sampled in; `ranking` indexes it
            ranking = [shown.index(i) for i in ids]
            responses = [texts[i] for i in shown]
            rankings.append(
                {"messages": messages, "responses": responses, "ranking": ranking, **trace}
            )
        elif r["choice"] == "tie":
            ties += 1
        else:
            chosen, rejected = ids if r["choice"] == "a" else ids[::-1]
            pairs.append(
                {
                    "messages": messages,
                    "chosen": texts[chosen],
                    "rejected": texts[rejected],
                    **trace,
                }
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "pairs.jsonl", pairs)
    write_jsonl_atomic(out_dir / "rankings.jsonl", rankings)
    write_jsonl_atomic(out_dir / "comparisons.jsonl", pairs + rankings)
    labels, report = read_labelled(out_dir / "comparisons.jsonl")
    write_jsonl_atomic(
        out_dir / "kto.jsonl",
        [
            {"messages": x.messages, "completion": x.completion, "label": x.desirable}
            for x in labels
        ],
    )
    summary = {
        "judgements": len(rows),
        "pairs": len(pairs),
        "rankings": len(rankings),
        "ties_left_out": ties,
        "kto_labels": report["labelled"],
        "kto_desirable": report["desirable"],
        "kto_dropped_middle": report["dropped_middle"],
        "identical_replies_left_out": report["dropped_identical"],
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
