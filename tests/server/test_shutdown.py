"""Graceful shutdown: running streams finish, new calls are refused, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from jserve import SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import start_server
from jserve.server.client import Client, decode_request, generate_request
from jserve.server.proto.generation_pb2 import FINISH_REASON_ABORT, FINISH_REASON_LENGTH
from jserve.server.servicers import SHUTDOWN_ABORT_MESSAGE
from tests.server.conftest import ENGINE
from tests.server.helpers import metric, wait_for_output, wait_until_free
from tests.server.openai_process import ENGINE_ARGS, ServeProcess

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


async def _read_until_error(call) -> tuple[list, grpc.aio.AioRpcError | None]:
    """A streaming call's messages, and the error that ended it (None: it ended OK)."""
    msgs = []
    try:
        while (msg := await call.read()) is not grpc.aio.EOF:
            msgs.append(msg)
    except grpc.aio.AioRpcError as e:
        return msgs, e
    return msgs, None


def _assert_aborted_by_shutdown(msgs, error, *, usage: bool = True) -> None:
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details() == SHUTDOWN_ABORT_MESSAGE
    if usage:
        last = msgs[-1]
        assert last.finish_reason == FINISH_REASON_ABORT
        assert last.HasField("usage") and last.usage.completion_tokens == sum(
            len(m.token_ids) for m in msgs
        )
        assert last.usage.completion_tokens > 0


@pytest.mark.timeout(60)
def test_streams_past_the_grace_period_end_with_abort_and_usage(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # 480 tokens take about 2 s, well past the 0.3 s grace period
        time.sleep(0.004)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def main():
        h = await start_server(aengine, port=0, jetstream_params=LONG_JETSTREAM)
        async with Client(f"127.0.0.1:{h.port}") as c:
            gen = c.generation.Generate(generate_request("All:", max_tokens=480, ignore_eos=True))
            dec = c.jetstream.Decode(decode_request("All:", max_tokens=480))
            gen_task = asyncio.create_task(_read_until_error(gen))
            dec_task = asyncio.create_task(_read_until_error(dec))
            while aengine.num_active < 2:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await h.stop(grace=0.3)
            assert time.monotonic() - t0 < 3
            _assert_aborted_by_shutdown(*await gen_task)
            msgs, error = await dec_task
            _assert_aborted_by_shutdown(msgs, error, usage=False)
            assert 0 < sum(len(m.stream_content.samples[0].token_ids) for m in msgs) < 480
        await wait_until_free(aengine)

    asyncio.run(main())


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
        port = int(wait_for_output(log, r"gRPC on 127\.0\.0\.1:(\d+)", proc, 120).group(1))

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
        wait_for_output(log, r"SIGTERM: draining 1 running request", proc, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _sse_lines(http: httpx.AsyncClient, body: dict, lines: list[str], started: asyncio.Event):
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line:
                lines.append(line)
                started.set()


@pytest.mark.timeout(180)
def test_second_sigterm_during_drain_ends_every_stream_at_once(
    tok_model_dir: str, tmp_path
) -> None:
    """Health is NOT_SERVING while the drain runs and the listeners are still open; a
    second SIGTERM ends every open stream at once: gRPC with FINISH_REASON_ABORT and
    usage, then UNAVAILABLE in jserve's words; HTTP with finish_reason abort and [DONE],
    and a call waiting for its whole answer with 503 in the same words."""
    grace = 120
    args = ["--model", tok_model_dir, *ENGINE_ARGS, "--grace-period", str(grace)]
    server = ServeProcess(str(tmp_path / "server.log"), args).start()
    try:

        async def main():
            async with (
                Client(f"127.0.0.1:{server.grpc_port}") as c,
                httpx.AsyncClient(base_url=server.url, timeout=60) as http,
            ):
                gen = c.generation.Generate(
                    generate_request("All:", max_tokens=500, ignore_eos=True)
                )
                dec = c.jetstream.Decode(decode_request("All:", max_tokens=500))
                first = await gen.read()  # admitted and generating
                gen_task = asyncio.create_task(_read_until_error(gen))
                dec_task = asyncio.create_task(_read_until_error(dec))
                lines: list[str] = []
                started = asyncio.Event()
                body = {"prompt": "All:", "max_tokens": 500, "ignore_eos": True, "stream": True}
                sse = asyncio.create_task(_sse_lines(http, body, lines, started))
                whole = asyncio.create_task(
                    http.post("/v1/completions", json={**body, "stream": False})
                )
                await asyncio.wait_for(started.wait(), 30)
                # All four admitted (the first SIGTERM refuses new calls).
                while metric((await http.get("/metrics")).text, "jserve_num_requests_running") < 4:
                    await asyncio.sleep(0.02)
                server.signal(signal.SIGTERM)
                # The drain has begun: both health checks say so on the open listeners.
                deadline = time.monotonic() + 10
                while await c.health() != "NOT_SERVING":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert (await http.get("/health")).status_code == 503
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate("All:", max_tokens=2)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in e.value.details()
                assert not gen_task.done() and not dec_task.done() and not sse.done()
                server.signal(signal.SIGTERM)
                t0 = time.monotonic()
                (msgs, gen_error), (dmsgs, dec_error) = await asyncio.wait_for(
                    asyncio.gather(gen_task, dec_task), 15
                )
                await asyncio.wait_for(sse, 10)
                return t0, [first, *msgs], gen_error, dmsgs, dec_error, lines, await whole

        t0, msgs, gen_error, dmsgs, dec_error, lines, whole = asyncio.run(main())
        assert time.monotonic() - t0 < 10
        _assert_aborted_by_shutdown(msgs, gen_error)
        _assert_aborted_by_shutdown(dmsgs, dec_error, usage=False)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
        assert whole.status_code == 503, whole.text
        assert whole.json()["error"]["message"] == SHUTDOWN_ABORT_MESSAGE
        assert server.proc.wait(timeout=10) == 0
        assert "Cancelling all calls" not in server.log()
    finally:
        server.stop()
