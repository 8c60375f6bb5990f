"""Start `lmforge serve` as a user does, in a subprocess on a free loopback port, for the
server's API, browser and load tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    db: Path
    token: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def launch(
    model_dir: Path, db: Path, token: str | None = None, port: int = 0, *extra: str
) -> Server:
    """Start the server and wait until it answers (at most 90 s)."""
    port = port or free_port()
    args = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port)]
    args += ["--db", str(db), *extra]
    if token:
        args += ["--token", token]
    log = open(db.with_suffix(f".{port}.log"), "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, db, token)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmforge serve exited with {proc.returncode}: {log.name}")
        try:
            if httpx.get(server.url + "/api/config", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"lmforge serve did not answer within 90 s: {log.name}")


@contextmanager
def start_server(
    model_dir: Path, db: Path, token: str | None = None, *extra: str
) -> Iterator[Server]:
    server = launch(model_dir, db, token, 0, *extra)
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
