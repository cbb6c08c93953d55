"""Constrained requests streaming concurrently through the gRPC server, some cancelled:
every completed one valid, no KV page or grammar state left behind, nothing compiled
after warm-up."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import generate_request
from jserve.server.proto import generation_pb2 as pb
from tests.engine.helpers import make_engine
from tests.engine.test_compile_guard import no_compiles
from tests.server.conftest import ENGINE
from tests.server.helpers import serving, wait_until_free
from tests.structured.test_structured import CHOICE, GRAMMAR, REGEX, SCHEMA, check

KINDS = {
    "json": pb.StructuredOutputs(json=json.dumps(SCHEMA)),
    "regex": pb.StructuredOutputs(regex=REGEX),
    "grammar": pb.StructuredOutputs(grammar=GRAMMAR),
    "choice": pb.StructuredOutputs(choice=pb.Choices(choices=CHOICE)),
}


@pytest.fixture(scope="module")
def warm_aengine(tok_model_dir: str):
    eng = AsyncLLMEngine(make_engine(tok_model_dir, warmup=True, **ENGINE))
    yield eng
    eng.shutdown()


def _concurrent(aengine: AsyncLLMEngine, num: int) -> None:
    rng = random.Random(num)
    kinds = list(KINDS)

    async def one(client, i: int) -> tuple[str, str | None, str | None]:
        kind = kinds[i % len(kinds)]
        cancel = rng.random() < 0.3
        req = generate_request(
            f"ROMEO:\n{i}", max_tokens=200, seed=i, structured_outputs=KINDS[kind]
        )
        call = client.generation.Generate(req, metadata=client.metadata)
        text, reason = "", None
        async for msg in call:
            text += msg.text
            if msg.finish_reason:
                reason = pb.FinishReason.Name(msg.finish_reason)
            if cancel:
                call.cancel()
                return kind, None, None
        return kind, text, reason

    async def main() -> list:
        async with serving(aengine) as (_, client):
            results = await asyncio.gather(*(one(client, i) for i in range(num)))
            await wait_until_free(aengine, timeout=30)
            return results

    with no_compiles():
        results = asyncio.run(main())
    done = [(k, t, r) for k, t, r in results if t is not None]
    assert len(done) >= num // 2
    for kind, text, reason in done:
        assert reason == "FINISH_REASON_STOP", (kind, text)
        check(kind, text)
    engine = aengine.engine
    assert engine.is_idle() and engine.structured.num_active == 0


def test_concurrent_constrained_streams_with_cancellations(warm_aengine) -> None:
    _concurrent(warm_aengine, 16)


def test_an_invalid_spec_is_invalid_argument(warm_aengine) -> None:
    import grpc

    async def main() -> None:
        async with serving(warm_aengine) as (_, client):
            for so in (pb.StructuredOutputs(regex="[0-"), pb.StructuredOutputs()):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.generate("A", structured_outputs=so)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "structured_outputs" in e.value.details()

    asyncio.run(main())
    assert warm_aengine.engine.is_idle()


@pytest.mark.slow
def test_64_concurrent_constrained_streams_with_cancellations(warm_aengine) -> None:
    _concurrent(warm_aengine, 64)
