"""Health follows readiness and engine state; metrics move with the traffic."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.llm_engine import MAX_FAILED_STEPS
from jserve.server import app
from jserve.server.app import start_server
from jserve.server.client import Client
from tests.engine.helpers import make_engine
from tests.server.conftest import ENGINE
from tests.server.helpers import metric, scrape, serving

pytestmark = pytest.mark.timeout(60)
SERVICES = ("", "jserve.v1.Generation", "jetstream_proto.Orchestrator")


def test_health_turns_serving_after_warmup_and_not_serving_on_stop(
    aengine: AsyncLLMEngine, monkeypatch
) -> None:
    async def main():
        gate = asyncio.Event()
        real_warm_up = app.warm_up

        async def gated_warm_up(aeng):
            await gate.wait()
            await real_warm_up(aeng)

        monkeypatch.setattr(app, "warm_up", gated_warm_up)
        h = await start_server(aengine, port=0, wait_ready=False)
        try:
            async with Client(f"127.0.0.1:{h.port}") as c:
                for name in SERVICES:
                    assert await c.health(name) == "NOT_SERVING"
                assert not await c.jetstream_is_live()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate("All:", max_tokens=2)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "warming up" in e.value.details()
                assert (await c.tokenize("All:")) != []  # tokenizer RPCs work meanwhile
                gate.set()
                await h.wait_ready(timeout=30)
                for name in SERVICES:
                    assert await c.health(name) == "SERVING"
                assert await c.jetstream_is_live()
                watch = c.health_stub.Watch(health_pb2.HealthCheckRequest())
                first = await watch.read()
                assert first.status == first.SERVING
                stopping = asyncio.create_task(h.stop(grace=5))
                second = await watch.read()
                assert second.status == second.NOT_SERVING
                await stopping
        finally:
            await h.stop(0)

    asyncio.run(main())


def test_metrics_move(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, metrics_port=0) as (h, c):
            before = scrape(h.metrics_port)
            await c.generate("All: speak", max_tokens=5, ignore_eos=True)
            await c.decode("All: speak", max_tokens=3)
            with pytest.raises(grpc.aio.AioRpcError):
                await c.generate("All:", top_p=7.0)
            after = scrape(h.metrics_port)
        return before, after

    before, after = asyncio.run(main())

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("jserve_requests_total", api="generation", outcome="length") == 1
    assert delta("jserve_requests_total", api="generation", outcome="invalid") == 1
    assert (
        delta("jserve_requests_total", api="jetstream", outcome="length")
        + delta("jserve_requests_total", api="jetstream", outcome="stopped")
        == 1
    )
    assert delta("jserve_time_to_first_token_seconds_count", api="generation") == 1
    assert delta("jserve_time_per_output_token_seconds_count", api="generation") == 1
    assert delta("jserve_e2e_request_latency_seconds_count", api="generation") == 1
    assert delta("jserve_generation_tokens_total") >= 5 + 1
    assert delta("jserve_prefix_cache_queries_total") > 0
    assert metric(after, "jserve_kv_pages_total") == ENGINE["num_pages"]
    assert metric(after, "jserve_engine_up") == 1
    for name in (
        "jserve_num_requests_running",
        "jserve_num_requests_waiting",
        "jserve_kv_pages_used",
        "jserve_prefix_cache_hits_total",
        "jserve_preemptions_total",
        "jserve_prefix_cache_hit_rate",
    ):
        assert f"\n{name} " in after, name


def test_engine_failure_is_internal_and_turns_health_not_serving(tok_model_dir: str) -> None:
    engine = make_engine(tok_model_dir, **ENGINE)
    aeng = AsyncLLMEngine(engine)

    async def main():
        async with serving(aeng, metrics_port=0) as (h, c):

            def broken(plan):
                raise RuntimeError("device lost")

            engine.runner.dispatch = broken
            calls = (lambda: c.generate("All:", max_tokens=3), lambda: c.decode("All:"))
            # A failed step fails only its request; steps failing MAX_FAILED_STEPS times
            # in a row end the engine.
            for i in range(MAX_FAILED_STEPS + 1):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await asyncio.wait_for(calls[i % 2](), 10)
                assert e.value.code() == grpc.StatusCode.INTERNAL
                if i < MAX_FAILED_STEPS:
                    assert await c.health() == "SERVING"
            assert "device lost" in e.value.details()
            for _ in range(100):
                if await c.health() == "NOT_SERVING":
                    break
                await asyncio.sleep(0.05)
            assert await c.health() == "NOT_SERVING"
            assert not await c.jetstream_is_live()
            # Other RPCs keep working.
            assert (await c.model_info()).vocab_size == engine.cfg.vocab_size
            assert await c.tokenize("All:")
            text = scrape(h.metrics_port)
            assert metric(text, "jserve_engine_up") == 0
            assert metric(text, "jserve_requests_total", api="generation", outcome="error") >= 1

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()
