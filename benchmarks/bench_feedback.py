"""Judgements under load: do concurrent annotators lose anything, even when the server is killed?

    python benchmarks/bench_feedback.py --model runs/default/sft [--clients 32] [--seconds 30]
        [--out FILE.json]

Starts `lmforge serve` on a fresh database, samples two answers to one prompt, then runs two
phases of `clients` concurrent clients, each posting pair judgements back to back for
`seconds`: phase "steady" undisturbed, phase "sigkill" with the server killed by SIGKILL
halfway through and started again on the same database. A client retries a judgement that got
no answer with the same request_id (the server's idempotency key) until it is acknowledged.
At the end every acknowledged request_id must be in the database exactly once, and no row may
exist that was never sent. Prints requests/s and p50/p99 latency of acknowledged requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import Server, launch  # noqa: E402


def answers(server: Server) -> list[int]:
    """Sample two answers to one prompt through the web app's API; their response ids."""
    body = {"messages": [{"role": "user", "content": "Name a river."}], "n": 2}
    body |= {"annotator": "bench", "max_tokens": 8}
    with httpx.stream("POST", server.url + "/api/respond", json=body, timeout=120) as r:
        r.raise_for_status()
        events = [json.loads(line) for line in r.iter_lines() if line]
    return [e["response_id"] for e in events if e["type"] == "response"]


async def client(
    n: int, state: dict, url: str, pair: list[int], deadline: float, seed: int
) -> None:
    """Post judgements until the deadline; a judgement is retried until acknowledged."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=30) as http:
        k = 0
        while time.monotonic() < deadline:
            request_id = f"{state['phase']}-{n}-{k}"
            body = {"kind": "pair", "response_ids": pair, "choice": rng.choice("ab")}
            body |= {"annotator": f"client{n}", "source": "api", "request_id": request_id}
            state["sent"].add(request_id)
            while True:
                start = time.monotonic()
                try:
                    r = await http.post(url + "/api/judgements", json=body)
                except httpx.TransportError:
                    state["retries"] += 1
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code != 200:
                    raise RuntimeError(f"{request_id}: {r.status_code} {r.text}")
                state["latency"].append(time.monotonic() - start)
                state["acked"].append(request_id)
                break
            k += 1


async def phase(
    name: str,
    server: Server,
    model: Path,
    pair: list[int],
    clients: int,
    seconds: float,
    kill: bool,
) -> tuple[dict, Server]:
    state = {"phase": name, "sent": set(), "acked": [], "latency": [], "retries": 0}
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    tasks = [
        asyncio.create_task(client(n, state, server.url, pair, deadline, n)) for n in range(clients)
    ]
    down = 0.0
    if kill:
        await asyncio.sleep(seconds / 2)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        killed = time.monotonic()
        port = int(server.url.rsplit(":", 1)[1])
        server = await asyncio.to_thread(launch, model, server.db, None, port)
        down = time.monotonic() - killed
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    latency = sorted(state["latency"])
    figures = {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "acknowledged": len(state["acked"]),
        "requests_per_s": round(len(state["acked"]) / (elapsed - down), 1),
        "p50_ms": round(1000 * statistics.median(latency), 2),
        "p99_ms": round(1000 * latency[int(0.99 * (len(latency) - 1))], 2),
        "retries_after_no_answer": state["retries"],
        "server_down_s": round(down, 2),
    }
    return figures | {"_state": state}, server


def check(db: Path, states: list[dict]) -> dict:
    """Every acknowledged request_id stored exactly once; nothing stored that was not sent."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    stored = con.execute("SELECT request_id, COUNT(*) FROM judgements GROUP BY request_id")
    counts = dict(stored.fetchall())
    con.close()
    acked = [r for s in states for r in s["acked"]]
    sent = set().union(*(s["sent"] for s in states))
    return {
        "acknowledged_missing": sum(1 for r in acked if counts.get(r, 0) == 0),
        "stored_twice": sum(1 for c in counts.values() if c > 1),
        "acknowledged_twice": len(acked) - len(set(acked)),
        "stored_never_sent": sum(1 for r in counts if r is not None and r not in sent),
        "rows": sum(counts.values()),
    }


def run(model: Path, clients: int, seconds: float, workdir: Path) -> dict:
    db = workdir / "feedback.sqlite3"
    server = launch(model, db)
    try:
        pair = answers(server)
        steady, server = asyncio.run(phase("steady", server, model, pair, clients, seconds, False))
        killed, server = asyncio.run(phase("sigkill", server, model, pair, clients, seconds, True))
    finally:
        server.proc.kill()
        server.proc.wait()
    verdict = check(db, [steady.pop("_state"), killed.pop("_state")])
    return {"steady": steady, "sigkill": killed, "check": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model or stage directory")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = run(args.model, args.clients, args.seconds, Path(workdir))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
