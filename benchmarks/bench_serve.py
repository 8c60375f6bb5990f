"""What batching buys a served model: the same chat requests, one client at a time vs at once.

    python benchmarks/bench_serve.py --model runs/default/sft [--requests 32] [--clients 16]
        [--max-tokens 64] [--rounds 3]

Starts `lmforge serve` and sends `requests` OpenAI chat completions (temperature 1, the
world's held-out questions when the model's run has them) twice per round: sequentially from
one client, and from `clients` concurrent clients, which the engine decodes in shared batches.
Prints completion tokens per second of each, their ratio, and the latency of a request (p50,
p99); medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import start_server  # noqa: E402


def questions(model: Path, n: int) -> list[str]:
    held = model.parent / "world" / "sft_eval_facts.jsonl"
    if not held.exists():
        return [f"Tell me something about the number {i}." for i in range(n)]
    records = [json.loads(line) for line in held.open(encoding="utf-8")]
    return [records[i % len(records)]["messages"][-1]["content"] for i in range(n)]


async def send(http: httpx.AsyncClient, url: str, name: str, text: str, args) -> tuple[int, float]:
    body = {"model": name, "messages": [{"role": "user", "content": text}]}
    body |= {"max_tokens": args.max_tokens, "temperature": 1.0}
    start = time.monotonic()
    r = await http.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.monotonic() - start


async def round_(url: str, name: str, texts: list[str], clients: int, args) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        queue = list(texts)
        results: list[tuple[int, float]] = []

        async def worker() -> None:
            while queue:
                results.append(await send(http, url, name, queue.pop(), args))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.monotonic() - start
    latency = sorted(s for _, s in results)
    return {
        "tokens_per_s": sum(t for t, _ in results) / elapsed,
        "p50_s": statistics.median(latency),
        "p99_s": latency[int(0.99 * (len(latency) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="stage or model directory")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = questions(args.model, args.requests)
    with (
        tempfile.TemporaryDirectory() as work,
        start_server(args.model, Path(work) / "feedback.sqlite3") as server,
    ):
        name = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        rounds = {"one client": [], f"{args.clients} clients": []}
        for _ in range(args.rounds):
            for label, clients in zip(rounds, (1, args.clients)):
                rounds[label].append(asyncio.run(round_(server.url, name, texts, clients, args)))
    figures = {
        label: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        for label, runs in rounds.items()
    }
    one, many = figures.values()
    figures["batching speed-up"] = round(many["tokens_per_s"] / one["tokens_per_s"], 2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
