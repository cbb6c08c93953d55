"""A real ``jserve serve --http-port`` process for the OpenAI-compatible API's tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from tests.server.helpers import wait_for_output

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tests/server/conftest.py's ENGINE, so the step programs come from the shared compilation cache.
ENGINE_ARGS = [
    "--dtype", "float32", "--no-warmup", "--page-size", "4", "--num-pages", "256",
    "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
]  # fmt: skip


class ServeProcess:
    """``python -m jserve.server.cli`` on free ports; ``url`` is the HTTP API's base URL."""

    def __init__(self, log_path: str, args: list[str], verify: Any = True) -> None:
        self.log_path = log_path
        self.args = args
        self.verify = verify  # for https: the CA file httpx should trust
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.grpc_port = 0

    def start(self, timeout: float = 180.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "jserve.server.cli", "--port", "0", "--http-port", "0"]
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [*cmd, *self.args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        m = self.wait_for(r"gRPC on 127\.0\.0\.1:(\d+) .*HTTP on (https?://\S+)", timeout)
        self.grpc_port, self.url = int(m.group(1)), m.group(2).rstrip(",")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the warm-up request compiles on first use
            try:
                if (
                    httpx.get(f"{self.url}/health", verify=self.verify, timeout=5).status_code
                    == 200
                ):
                    return self
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log()
            time.sleep(0.2)
        raise AssertionError(f"the server never became healthy:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        assert self.proc is not None, "start() the server first"
        return wait_for_output(self.log_path, pattern, self.proc, timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
