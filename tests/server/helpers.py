"""Helpers for server tests: a running server per scenario, page checks, metric scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import ServerHandle, start_server
from jserve.server.client import Client


@contextlib.asynccontextmanager
async def serving(
    aengine: AsyncLLMEngine, *, client_kw: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[tuple[ServerHandle, Client]]:
    """A server on a free loopback port and a client connected to it."""
    handle = await start_server(aengine, **{"port": 0, **config})
    try:
        async with Client(f"127.0.0.1:{handle.port}", **(client_kw or {})) as client:
            yield handle, client
    finally:
        await handle.stop(grace=5)


async def wait_until_free(aengine: AsyncLLMEngine, timeout: float = 5.0) -> float:
    """Waits until no request is active and no KV page is held; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if aengine.num_active == 0 and aengine.engine.pool.num_used == 0:
            return time.monotonic() - t0
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"still {aengine.num_active} active requests and "
        f"{aengine.engine.pool.num_used} pages used after {timeout}s"
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def wait_for_output(path: str, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    """The first match of ``pattern`` in a process's log file, waiting up to ``timeout``
    seconds (less if the process ends); fails with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8", errors="replace") as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(path, encoding="utf-8", errors="replace") as f:
        raise AssertionError(f"no {pattern!r} in the output:\n{f.read()[-4000:]}")
