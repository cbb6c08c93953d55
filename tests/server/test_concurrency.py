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
def test_deadline_frees_pages(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, jetstream_params=LONG_JETSTREAM) as (_, c):
            for start in (
                lambda: c.generate(PROMPTS[2], max_tokens=480, ignore_eos=True, timeout=0.3),
                lambda: c.decode(PROMPTS[3], max_tokens=480, timeout=0.3),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await start()
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await wait_until_free(aengine, timeout=2.0)
            # The server serves on.
            r = await c.generate(PROMPTS[0], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(r.token_ids[0]) == 4

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cancels_racing_admission_leave_the_engine_healthy(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    """Deadlines that expire while the engine thread is still admitting the request.

    The engine admits new requests between steps. Cancelling its admission
    wait once killed the step thread; no client timing may do that.
    """
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # a long step widens the admission window
        time.sleep(0.03)
        return real_step()

    async def main():
        async with serving(aengine) as (_, c):
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
            r = await c.generate(PROMPTS[0], max_tokens=4, ignore_eos=True, timeout=10)
            assert len(r.token_ids[0]) == 4

    asyncio.run(main())
