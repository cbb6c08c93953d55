"""What a hostile client tries against the server: ids, sizes, malformed bytes, floods."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import httpx
import pytest

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import generate_request
from tests.server.helpers import serving, wait_until_free


@contextlib.asynccontextmanager
async def running(c, request_id: str):
    """A long Generate under a client-chosen id, running until the block ends."""
    call = c.generation.Generate(
        generate_request("All:", max_tokens=500, ignore_eos=True, request_id=request_id)
    )
    await call.read()  # admitted and generating
    try:
        yield call
    finally:
        call.cancel()


@pytest.mark.timeout(60)
def test_client_ids_never_collide_with_the_servers(aengine: AsyncLLMEngine, monkeypatch) -> None:
    """A client taking ids of the server's form ahead of time fails nobody else's calls."""
    engine = aengine.engine
    real_step = engine.step

    def slow_step():  # the long requests outlive the test's other calls
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def main():
        async with serving(aengine, http_port=0) as (h, c):
            first = await c.generate("All:", max_tokens=1)
            assert first.request_id  # a server-made id, e.g. gen-<hex>...
            head, _, tail = first.request_id.rpartition("-")
            if tail.isdigit():  # a counter: guess what comes next
                hexpart, n = head.split("-", 1)[1], int(tail)
            else:
                hexpart, n = tail, 0
            guesses = [f"gen-{hexpart}-{n + 1}", f"js-{hexpart}-{n + 2}"]
            guesses += [f"completions-{hexpart}-{n + 3}", f"chat-{hexpart}-{n + 4}"]
            async with contextlib.AsyncExitStack() as stack:
                for g in guesses:
                    await stack.enter_async_context(running(c, g))
                # Another client's server-assigned id, reused while its request runs.
                other = c.generation.Generate(
                    generate_request("All:", max_tokens=500, ignore_eos=True)
                )
                stack.callback(other.cancel)
                taken = (await other.read()).request_id
                await stack.enter_async_context(running(c, taken))
                r = await c.generate("All:", max_tokens=2)
                assert len(r.token_ids[0]) == 2
                d = await c.decode("All:", max_tokens=2)
                assert len(d.token_ids[0]) == 2
                async with httpx.AsyncClient(base_url=h.http_url, timeout=30) as http:
                    resp = await http.post(
                        "/v1/completions", json={"prompt": "All:", "max_tokens": 2}
                    )
                    assert resp.status_code == 200, resp.text
                # The client's own ids stay its own: a duplicate of a running one is refused.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate("All:", max_tokens=2, request_id=guesses[0])
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "already in use" in e.value.details()
            # Responses carry the id the client chose.
            r = await c.generate("All:", max_tokens=1, request_id=guesses[0])
            assert r.request_id == guesses[0]
        await wait_until_free(aengine)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_tokenizer_calls_are_capped_like_prompts(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, http_port=0) as (h, c):
            chars, ids = h.core.max_prompt_chars, aengine.engine.max_model_len
            assert chars == ids * 32  # Generate's own limits
            for call, field in (
                (c.tokenize("a" * (chars + 1)), "text"),
                (c.detokenize([1] * (ids + 1)), "token_ids"),
                (c.generate([1] * (ids + 1), max_tokens=1), "prompt"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details().startswith(f"{field} has "), e.value.details()
            async with httpx.AsyncClient(base_url=h.http_url, timeout=30) as http:
                for path, body, field in (
                    ("/tokenize", {"prompt": "a" * (chars + 1)}, "prompt"),
                    ("/detokenize", {"tokens": [1] * (ids + 1)}, "tokens"),
                    ("/v1/completions", {"prompt": [1] * (ids + 1), "max_tokens": 1}, "prompt"),
                ):
                    r = await http.post(path, json=body)
                    assert r.status_code == 400, (path, r.text)
                    assert r.json()["error"]["param"] == field
            # Just under the limits is served.
            assert len(await c.tokenize("a" * chars)) > 0
            assert isinstance(await c.detokenize([1] * ids), str)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_tokenize_burst_queues_on_few_threads_while_generation_goes_on(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    from jserve.server.servicers import TOKENIZER_THREADS

    tok = aengine.engine.tokenizer
    real_encode = tok.encode
    busy, peak = 0, 0

    def slow_encode(*args, **kwargs):
        nonlocal busy, peak
        busy += 1  # under the GIL: exact enough for a peak count
        peak = max(peak, busy)
        try:
            time.sleep(0.1)
            return real_encode(*args, **kwargs)
        finally:
            busy -= 1

    monkeypatch.setattr(tok, "encode", slow_encode)

    async def main():
        async with serving(aengine) as (_, c):
            prompt = real_encode("All:")
            burst = [asyncio.create_task(c.tokenize("All: " * 100)) for _ in range(32)]
            r = await c.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(r.token_ids[0]) == 4
            assert not all(t.done() for t in burst)  # generation did not wait for them
            assert all(await asyncio.gather(*burst))
        assert 1 <= peak <= TOKENIZER_THREADS

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_text_prompts_are_tokenized_on_the_same_few_threads(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    """Generate, Decode and HTTP text prompts share Tokenize's bounded pool, so a flood
    of long text prompts queues there instead of taking the default executor."""
    import threading

    from jserve.server.servicers import TOKENIZER_THREADS

    tok = aengine.engine.tokenizer
    real_encode = tok.encode
    busy, peak, threads = 0, 0, set()

    def slow_encode(*args, **kwargs):
        nonlocal busy, peak
        threads.add(threading.current_thread().name)
        busy += 1  # under the GIL: exact enough for a peak count
        peak = max(peak, busy)
        try:
            time.sleep(0.05)
            return real_encode(*args, **kwargs)
        finally:
            busy -= 1

    monkeypatch.setattr(tok, "encode", slow_encode)

    async def main():
        async with (
            serving(aengine, http_port=0) as (h, c),
            httpx.AsyncClient(base_url=h.http_url, timeout=30) as http,
        ):
            body = {"prompt": "All: " * 3, "max_tokens": 1}
            calls = [c.generate("All: " * 3, max_tokens=1) for _ in range(6)]
            calls += [c.decode("All: " * 3, max_tokens=1) for _ in range(3)]
            calls += [http.post("/v1/completions", json=body) for _ in range(3)]
            results = await asyncio.gather(*calls)
            assert all(r.status_code == 200 for r in results[-3:])
        assert 1 <= peak <= TOKENIZER_THREADS
        assert threads and all(t.startswith("jserve-tokenizer") for t in threads), threads

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_malformed_protobuf_bytes_are_invalid_argument_in_plain_words(
    aengine: AsyncLLMEngine,
) -> None:
    garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint field key

    async def main():
        async with serving(aengine, http_port=0) as (h, c):
            ch = c.channel
            calls = [
                ch.unary_stream("/jserve.v1.Generation/Generate")(garbage),
                ch.unary_unary("/jserve.v1.Generation/Tokenize")(garbage),
                ch.unary_stream("/jetstream_proto.Orchestrator/Decode")(garbage),
                ch.unary_unary("/grpc.health.v1.Health/Check")(garbage),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    if hasattr(call, "read"):
                        await call.read()
                    await call
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
                details = e.value.details()
                assert details.startswith("malformed request"), details
                assert "Error" not in details and "<class" not in details, details
            r = await c.generate("All:", max_tokens=2)  # still serving
            assert len(r.token_ids[0]) == 2
            async with httpx.AsyncClient(base_url=h.http_url, timeout=30) as http:
                r = await http.post(
                    "/v1/completions",
                    content=b'{"prompt": "a", \xff',
                    headers={"content-type": "application/json"},
                )
                assert r.status_code == 400, r.text
                assert "Error" not in r.json()["error"]["message"]

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_jetstream_text_and_its_ids_run_the_same_prompt(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    """As in JetStream's orchestrator: BOS goes in front of text and token content alike."""
    from jserve.server.servicers import ServingCore

    bos = 1  # a BOS this tokenizer never adds itself
    monkeypatch.setattr(ServingCore, "bos_token_id", property(lambda self: bos))
    tok = aengine.engine.tokenizer
    text = "All: citizens"
    ids = tok.encode(text, add_special_tokens=False)
    assert bos not in ids and tok.encode(text) == ids

    async def main():
        async with serving(aengine) as (_, c):
            want = (await c.generate([bos, *ids], max_tokens=8, temperature=0.0)).token_ids
            for has_bos, prompts in (
                (False, (text, ids)),
                (True, (tok.decode([bos], skip_special_tokens=False) + text, [bos, *ids])),
            ):
                for p in prompts:
                    r = await c.decode(p, max_tokens=8, has_bos=has_bos)
                    assert r.token_ids[0] == want[0][: len(r.token_ids[0])], (has_bos, p)
                    assert len(r.token_ids[0]) > 0

    asyncio.run(main())
