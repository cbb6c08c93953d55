"""Graceful shutdown: running streams finish, new calls are refused, the process exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from jserve import SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import start_server
from jserve.server.client import Client, generate_request
from jserve.server.proto.generation_pb2 import FINISH_REASON_LENGTH
from tests.server.conftest import ENGINE
from tests.server.helpers import wait_until_free

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG_JETSTREAM = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.mark.timeout(60)
def test_stop_drains_running_streams_and_refuses_new_ones(aengine: AsyncLLMEngine) -> None:
    async def main():
        h = await start_server(aengine, port=0, jetstream_params=LONG_JETSTREAM)
        async with Client(f"127.0.0.1:{h.port}") as c:
            streams = [
                asyncio.create_task(c.generate("All:", max_tokens=120, ignore_eos=True)),
                asyncio.create_task(c.decode("All:", max_tokens=120)),
            ]
            while aengine.engine.get_stats().generation_tokens == 0 or aengine.num_active < 2:
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(h.stop(grace=30))
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate("All:", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            gen, dec = await asyncio.gather(*streams)
            assert len(gen.token_ids[0]) == 120 and gen.finish_reasons == ["length"]
            assert len(dec.token_ids[0]) == 120
            await asyncio.wait_for(stopping, 10)
        await wait_until_free(aengine)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_streams_past_the_grace_period_are_cancelled(aengine: AsyncLLMEngine, monkeypatch) -> None:
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # 480 tokens take about 2 s, well past the 0.3 s grace period
        time.sleep(0.004)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def main():
        h = await start_server(aengine, port=0)
        async with Client(f"127.0.0.1:{h.port}") as c:
            stream = asyncio.create_task(c.generate("All:", max_tokens=480, ignore_eos=True))
            while aengine.num_active < 1:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await h.stop(grace=0.3)
            assert time.monotonic() - t0 < 5
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stream
            # gRPC's own cancel-all says UNAVAILABLE; ours (same moment) CANCELLED.
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await wait_until_free(aengine)

    asyncio.run(main())


def _wait_for(path: str, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
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
        raise AssertionError(f"no {pattern!r} in the server's output:\n{f.read()[-4000:]}")


@pytest.mark.timeout(180)
def test_sigterm_during_a_stream_lets_it_finish_and_exits_0(tok_model_dir: str, tmp_path) -> None:
    log = str(tmp_path / "server.log")
    grace = 30
    cmd = [
        sys.executable, "-m", "jserve.server.cli", "--model", tok_model_dir, "--dtype", "float32",
        "--port", "0", "--grace-period", str(grace), "--no-warmup",
        "--page-size", str(ENGINE["page_size"]), "--num-pages", str(ENGINE["num_pages"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        port = int(_wait_for(log, r"gRPC on 127\.0\.0\.1:(\d+)", proc, 120).group(1))

        async def main():
            async with Client(f"127.0.0.1:{port}") as c:
                while await c.health() != "SERVING":
                    await asyncio.sleep(0.1)
                call = c.generation.Generate(
                    generate_request("All:", max_tokens=480, ignore_eos=True)
                )
                tokens, finish, t0 = 0, None, 0.0
                async for msg in call:
                    tokens += len(msg.token_ids)
                    finish = msg.finish_reason
                    if tokens == 3:  # mid-stream
                        proc.send_signal(signal.SIGTERM)
                        t0 = time.monotonic()
                return tokens, finish, t0

        tokens, finish, t0 = asyncio.run(main())
        assert tokens == 480 and finish == FINISH_REASON_LENGTH
        assert proc.wait(timeout=grace) == 0
        assert time.monotonic() - t0 < grace
        _wait_for(log, r"SIGTERM: draining 1 running request", proc, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
