"""A two-process `jserve serve` group that loses a process: the rest of the group
fails the running stream with UNAVAILABLE within seconds and exits with EXIT_PEER_LOST."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from jserve.engine.multihost import EXIT_PEER_LOST
from jserve.server.client import Client, generate_request
from tests.server.helpers import wait_for_output

pytestmark = pytest.mark.timeout(300)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the coordinator's, and the step channel's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two free ports in a row")


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_a_killed_process_ends_the_group_in_seconds(llama_dir: str, tmp_path, victim) -> None:
    """Killing the follower: the leader fails the stream with UNAVAILABLE and exits with
    EXIT_PEER_LOST. Killing the leader: the follower exits the same way."""
    port = _free_port_pair()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    logs = [str(tmp_path / f"p{pid}.log") for pid in (0, 1)]
    procs = []
    for pid in (0, 1):
        cmd = [
            sys.executable, "-m", "jserve.server.cli", "--model", llama_dir, "--dtype", "float32",
            "--tensor-parallel-size", "2", "--num-processes", "2", "--process-id", str(pid),
            "--coordinator-address", f"127.0.0.1:{port}", "--heartbeat-timeout", "2",
            "--no-warmup", "--port", "0", "--page-size", "4", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "16",
        ]  # fmt: skip
        with open(logs[pid], "w") as out:
            procs.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            )
    leader, follower = procs
    try:
        grpc_port = int(
            wait_for_output(logs[0], r"gRPC on 127\.0\.0\.1:(\d+)", leader, 200).group(1)
        )

        async def main():
            async with Client(f"127.0.0.1:{grpc_port}") as c:
                deadline = time.monotonic() + 120
                while await c.health() != "SERVING":
                    assert time.monotonic() < deadline and leader.poll() is None
                    await asyncio.sleep(0.2)
                call = c.generation.Generate(
                    generate_request([5, 17, 3], max_tokens=200, ignore_eos=True)
                )
                await call.read()  # generating on both processes
                (follower if victim == "follower" else leader).send_signal(signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                return e.value, time.monotonic() - t0

        error, seconds = asyncio.run(main())
        if victim == "leader":
            assert follower.wait(timeout=15) == EXIT_PEER_LOST
            with open(logs[1], encoding="utf-8", errors="replace") as f:
                out = f.read()
            assert "jserve: lost the multi-host leader" in out, out[-3000:]
            assert "Traceback" not in out, out[-3000:]
            return
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "lost multi-host process 1" in error.details()
        assert seconds < 5
        assert leader.wait(timeout=15) == EXIT_PEER_LOST
        with open(logs[0], encoding="utf-8", errors="replace") as f:
            out = f.read()
        assert "jserve: lost multi-host process 1" in out and "exiting" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
