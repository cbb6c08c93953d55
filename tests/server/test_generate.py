"""Generation over real loopback sockets, through both APIs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jserve import SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import generate_request
from tests.engine.helpers import make_engine, run
from tests.server.conftest import ENGINE
from tests.server.helpers import metric, scrape, serving, wait_until_free

PROMPT = "First Citizen:"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def offline(tok_model_dir: str):
    """Greedy results of the engine run directly (no server)."""
    engine = make_engine(tok_model_dir, **ENGINE)
    ids = engine.tokenizer.encode(PROMPT)
    reqs = [
        ("text", PROMPT, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), 0),
        ("ids", ids[:3], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), 0),
        ("eos", PROMPT, SamplingParams(max_tokens=24, temperature=0.0), 0),
    ]
    return run(engine, reqs)


def test_both_apis_stream_the_offline_tokens(aengine: AsyncLLMEngine, offline) -> None:
    eos = set(aengine.engine.cfg.eos_token_ids)

    def without_eos(ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in eos else ids

    async def main():
        async with serving(aengine) as (_, c):
            r = await c.generate(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True)
            want = offline["text"].outputs[0]
            assert r.token_ids == [want.token_ids] and r.text == [want.text]
            assert r.finish_reasons == ["length"]
            assert len(r.message_times) > 1  # streamed, not one final message
            assert r.usage.completion_tokens == 24
            assert r.usage.prompt_tokens == len(offline["text"].prompt_token_ids)

            prompt_ids = offline["ids"].prompt_token_ids
            r = await c.generate(prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True)
            assert r.token_ids == [offline["ids"].outputs[0].token_ids]

            # JetStream: greedy by default, stops at EOS and does not return it.
            want = offline["eos"].outputs[0]
            r = await c.decode(PROMPT, max_tokens=24)
            assert r.token_ids == [without_eos(want.token_ids)]
            assert r.text == [want.text]
            assert max(r.message_tokens) == 1  # one message per step, like JetStream
            # has_bos text is tokenized without special tokens (this tokenizer adds none).
            r = await c.decode(PROMPT, max_tokens=24, has_bos=True)
            assert r.token_ids == [without_eos(want.token_ids)] and r.text == [want.text]
            r = await c.decode(prompt_ids, max_tokens=16)  # client-side tokenization: ids only
            assert r.token_ids == [without_eos(offline["ids"].outputs[0].token_ids)]
            assert r.text == [""]

    asyncio.run(main())


def test_samples_logprobs_and_usage(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine) as (_, c):
            r = await c.generate(PROMPT, n=3, max_tokens=6, seed=7, logprobs=2, ignore_eos=True)
            assert len(r.token_ids) == 3 and all(len(t) == 6 for t in r.token_ids)
            assert r.finish_reasons == ["length"] * 3
            assert r.usage.completion_tokens == 18
            for ids, lps in zip(r.token_ids, r.logprobs, strict=True):
                assert [lp.sampled.token_id for lp in lps] == ids
                for lp in lps:
                    assert [t.rank for t in lp.top] == [1, 2]
                    assert lp.top[0].logprob >= lp.top[1].logprob >= lp.sampled.logprob - 1e-6
            again = await c.generate(PROMPT, n=3, max_tokens=6, seed=7, ignore_eos=True)
            assert again.token_ids == r.token_ids  # seeded sampling is reproducible

            r = await c.decode(PROMPT, max_tokens=5, num_samples=2)
            assert len(r.token_ids) == 2 and r.token_ids[0] == r.token_ids[1]  # greedy

    asyncio.run(main())


def test_stop_strings_and_tokens(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine) as (_, c):
            full = await c.generate(PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True)
            ids, text = full.token_ids[0], full.text[0]
            r = await c.generate(
                PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[4]]
            )
            assert r.token_ids[0] == ids[: ids.index(ids[4]) + 1]
            assert r.finish_reasons == ["stop"] and r.stop_reasons == [ids[4]]
            stop = text[3:5]
            r = await c.generate(
                PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]
            )
            assert r.text == [text[: text.index(stop)]] and r.stop_reasons == [stop]

    asyncio.run(main())


def test_tokenizer_rpcs_and_model_info(aengine: AsyncLLMEngine) -> None:
    tok = aengine.engine.tokenizer

    async def main():
        async with serving(aengine, model_name="tiny") as (_, c):
            ids = await c.tokenize("All: Speak, speak.")
            assert ids == tok.encode("All: Speak, speak.")
            assert await c.detokenize(ids) == "All: Speak, speak."
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.detokenize([10**6])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            info = await c.model_info()
            assert info.model_name == "tiny" and info.max_model_len == 512
            assert info.vocab_size == aengine.engine.cfg.vocab_size
            assert list(info.eos_token_ids) == [0] and info.has_tokenizer
            assert info.max_n == ENGINE["max_num_seqs"] and info.max_logprobs == 20

    asyncio.run(main())


# (request fields, expected message) for every kind of bad input the engine refuses.
BAD_INPUTS = [
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 320]), "outside the vocabulary"),
    (dict(prompt=[-1]), "outside the vocabulary"),
    (dict(prompt=[1] * 600), "maximum length"),
    (dict(max_tokens=600), "exceeds the model's maximum length"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=11.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n must be at least 1"),
    (dict(n=9), "max_num_seqs"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop strings"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(stop_token_ids=[999]), "outside the vocabulary"),
]


def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving(
    aengine: AsyncLLMEngine,
) -> None:
    async def main():
        async with serving(aengine) as (_, c):
            for fields, message in BAD_INPUTS:
                fields = dict(fields)
                prompt = fields.pop("prompt", PROMPT)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate(prompt, **fields)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, e.value)
                assert message in e.value.details(), (fields, e.value.details())
            # No prompt at all, and JetStream's own bad inputs.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(generate_request(PROMPT).__class__())
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for kw, message in [
                (dict(prompt=""), "empty"),
                (dict(prompt=[]), "empty"),
                (dict(prompt=[5, 400]), "vocabulary"),
                (dict(prompt=PROMPT, max_tokens=-1), "max_tokens"),
                (dict(prompt=PROMPT, num_samples=100), "max_num_seqs"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.decode(**kw)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
                assert message in e.value.details(), (kw, e.value.details())
            r = await c.generate(PROMPT, max_tokens=3, temperature=0.0)
            assert r.finish_reasons[0] in ("length", "stop")
            await wait_until_free(aengine)

    asyncio.run(main())


def test_size_limits(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, max_request_bytes=4096) as (_, c):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate("x" * 10_000, max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with serving(aengine) as (h, c):
            limit = h.core.max_prompt_chars
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate("y" * (limit + 1), max_tokens=2)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "characters" in e.value.details()
            r = await c.generate("z", max_tokens=2)
            assert len(r.token_ids[0]) <= 2

    asyncio.run(main())


def test_queue_full_is_resource_exhausted(tok_model_dir: str) -> None:
    aeng = AsyncLLMEngine(
        make_engine(tok_model_dir, **{**ENGINE, "max_num_seqs": 1, "max_waiting": 1})
    )

    async def main():
        async with serving(aeng) as (_, c):
            long = c.generate(PROMPT, max_tokens=200, ignore_eos=True, temperature=0.0)
            first = asyncio.create_task(long)
            while aeng.get_stats().num_running < 1:
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(c.generate(PROMPT, max_tokens=2))
            while aeng.get_stats().num_waiting < 1:
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(PROMPT, max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in e.value.details()
            await asyncio.gather(first, queued)

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_a_request_that_could_never_fit_is_invalid_argument(tok_model_dir: str) -> None:
    # 16 pages of 4 tokens: no request may ever need more than 64 tokens of KV.
    aeng = AsyncLLMEngine(make_engine(tok_model_dir, **{**ENGINE, "num_pages": 16}))

    async def main():
        async with serving(aeng, metrics_port=0) as (h, c):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(PROMPT, max_tokens=100)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could never run" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.decode(PROMPT, max_tokens=100)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could never run" in e.value.details()
            text = scrape(h.metrics_port)
            for api in ("generation", "jetstream"):
                assert metric(text, "jserve_requests_total", api=api, outcome="invalid") == 1
                assert metric(text, "jserve_requests_total", api=api, outcome="rejected") == 0
            r = await c.generate(PROMPT, max_tokens=8, ignore_eos=True)  # one that fits
            assert len(r.token_ids[0]) == 8

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()
