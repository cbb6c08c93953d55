"""Many clients at once, cancellation and deadlines: every page comes back."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from jserve import SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import decode_request, generate_request
from jserve.server.servicers import GenerationServicer
from tests.engine.helpers import make_engine, run
from tests.server.conftest import ENGINE
from tests.server.helpers import metric, scrape, serving, wait_until_free

PROMPTS = [f"All: {i} citizens" for i in range(8)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference(tok_model_dir: str) -> dict[str, list[int]]:
    engine = make_engine(tok_model_dir, **ENGINE)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out = run(engine, [(p, p, sp, 0) for p in PROMPTS])
    return {p: out[p].outputs[0].token_ids for p in PROMPTS}


@pytest.mark.timeout(120)
def test_64_concurrent_clients(aengine: AsyncLLMEngine, reference, tok_model_dir: str) -> None:
    tok = aengine.engine.tokenizer
    clients, per_client = 64, 3

    async def client(c, i: int) -> list[tuple[str, str, list[int]]]:
        got = []
        for j in range(per_client):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            if (i + j) % 2:
                r = await c.generate(
                    prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
                )
                assert r.finish_reasons == ["length"]
                got.append(("generation", prompt, r.token_ids[0]))
            else:
                r = await c.decode(tok.encode(prompt), max_tokens=MAX_TOKENS)
                got.append(("jetstream", prompt, r.token_ids[0]))
        return got

    async def main():
        async with serving(aengine, metrics_port=0) as (h, c):
            before = scrape(h.metrics_port)
            results = await asyncio.gather(*(client(c, i) for i in range(clients)))
            await wait_until_free(aengine)
            after = scrape(h.metrics_port)
        return results, before, after

    results, before, after = asyncio.run(main())
    eos = set(aengine.engine.cfg.eos_token_ids)
    for got in results:
        for api, prompt, ids in got:
            want = reference[prompt]
            if api == "jetstream" and eos & set(want):  # stops at EOS and leaves it out
                want = want[: next(k for k, t in enumerate(want) if t in eos)]
            assert ids == want, prompt
    assert aengine.wait_idle(5) and aengine.engine.pool.num_used == 0
    done = sum(
        metric(after, "jserve_requests_total", api=api, outcome="length")
        - metric(before, "jserve_requests_total", api=api, outcome="length")
        for api in ("generation", "jetstream")
    )
    assert done == clients * per_client


# JetStream requests stop at EOS; these tests need them to run long.
LONG_JETSTREAM = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.mark.timeout(60)
def test_cancel_mid_stream_frees_pages(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, metrics_port=0, jetstream_params=LONG_JETSTREAM) as (h, c):
            for start in (
                lambda: c.generation.Generate(
                    generate_request(PROMPTS[0], max_tokens=400, ignore_eos=True)
                ),
                lambda: c.jetstream.Decode(decode_request(PROMPTS[1], max_tokens=400)),
            ):
                call = start()
                n = 0
                async for _ in call:
                    n += 1
                    if n == 3:
                        break
                assert aengine.engine.pool.num_used > 0  # still generating
                call.cancel()
                await wait_until_free(aengine, timeout=2.0)
            text = scrape(h.metrics_port)
            assert metric(text, "jserve_requests_total", api="generation", outcome="cancelled") == 1
            assert metric(text, "jserve_requests_total", api="jetstream", outcome="cancelled") == 1
            assert metric(text, "jserve_kv_pages_used") == 0

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cancel_while_grpc_sends_a_message_frees_pages(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    """gRPC may cancel an RPC while it sends a message, outside the handler, leaving the
    handler suspended at a yield: dropping the handler still closes its engine stream."""
    real_generate = GenerationServicer.Generate
    landed: list[bool] = []

    async def slow_sender(self, request, context):  # iterates the handler as gRPC does
        async for msg in real_generate(self, request, context):
            try:
                await asyncio.sleep(0.05)  # stands for gRPC sending `msg`
            except asyncio.CancelledError:
                landed.append(True)
                raise
            yield msg

    monkeypatch.setattr(GenerationServicer, "Generate", slow_sender)

    async def main():
        async with serving(aengine, metrics_port=0) as (h, c):
            call = c.generation.Generate(
                generate_request(PROMPTS[0], max_tokens=400, ignore_eos=True)
            )
            await call.read()
            assert aengine.engine.pool.num_used > 0
            call.cancel()
            await wait_until_free(aengine, timeout=2.0)
            text = scrape(h.metrics_port)
            assert metric(text, "jserve_requests_total", api="generation", outcome="cancelled") == 1

    asyncio.run(main())
    assert landed == [True]


@pytest.mark.timeout(60)
def test_a_refused_duplicate_request_id_leaves_the_running_request_alone(
    aengine: AsyncLLMEngine,
) -> None:
    """Another client's request with the id of a running one is refused, and only it ends."""

    async def main():
        async with serving(aengine) as (h, c):
            first = asyncio.create_task(
                c.generate(PROMPTS[0], request_id="x", max_tokens=400, ignore_eos=True)
            )
            while "x" not in h.core.client_ids:
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(PROMPTS[1], request_id="x", max_tokens=4)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "already in use" in e.value.details()
            # Duplicates whose deadline may expire while they wait for admission.
            rng = random.Random(1)
            late = await asyncio.gather(
                *(
                    c.generate(PROMPTS[2], request_id="x", timeout=rng.uniform(0.001, 0.02))
                    for _ in range(20)
                ),
                return_exceptions=True,
            )
            for err in late:
                assert isinstance(err, grpc.aio.AioRpcError), err
                assert err.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), err
            assert not first.done()  # all refused while the first one was generating
            r = await first
            assert r.finish_reasons == ["length"] and len(r.token_ids[0]) == 400
            await wait_until_free(aengine)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_deadline_frees_pages(aengine: AsyncLLMEngine, monkeypatch) -> None:
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # 480 tokens take about 2 s, well past the 0.3 s deadline
        time.sleep(0.004)
        return real_step()

    async def main():
        async with serving(aengine, jetstream_params=LONG_JETSTREAM) as (_, c):
            monkeypatch.setattr(engine, "step", slow_step)
            for start in (
                lambda: c.generate(PROMPTS[2], max_tokens=480, ignore_eos=True, timeout=0.3),
                lambda: c.decode(PROMPTS[3], max_tokens=480, timeout=0.3),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await start()
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await wait_until_free(aengine, timeout=2.0)
            monkeypatch.undo()
            # The server serves on.
            r = await c.generate(PROMPTS[0], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(r.token_ids[0]) == 4

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cancels_racing_admission_leave_the_engine_healthy(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    """Deadlines that expire while the handler waits for the engine to admit its request.

    The engine admits new requests between steps, so a deadline can cancel
    ``AsyncLLMEngine.generate`` before, during or after admission. No client
    timing may kill the step thread or leave a request running.
    """
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # a long step widens the admission window
        time.sleep(0.03)
        return real_step()

    async def main():
        async with serving(aengine) as (_, c):
            admitted0, aborted0 = engine.stats.num_requests, engine.stats.num_aborted
            monkeypatch.setattr(engine, "step", slow_step)
            busy = asyncio.create_task(c.generate(PROMPTS[0], max_tokens=200, ignore_eos=True))
            while aengine.num_active < 1:
                await asyncio.sleep(0.005)
            rng = random.Random(0)
            calls = [
                c.generate(PROMPTS[i % 8], max_tokens=64, timeout=rng.uniform(0.005, 0.04))
                for i in range(40)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
            monkeypatch.undo()
            for r in results:
                if isinstance(r, BaseException):
                    assert isinstance(r, grpc.aio.AioRpcError), r
                    assert r.code() == grpc.StatusCode.DEADLINE_EXCEEDED, r
            await wait_until_free(aengine, timeout=5)
            assert aengine.dead is None and aengine._thread.is_alive()
            # Some calls ended before the engine took them; every one it took was aborted.
            admitted = engine.stats.num_requests - admitted0
            assert admitted < 1 + len(calls)
            assert engine.stats.num_aborted - aborted0 == admitted
            r = await c.generate(PROMPTS[0], max_tokens=4, ignore_eos=True, timeout=10)
            assert len(r.token_ids[0]) == 4

    asyncio.run(main())
