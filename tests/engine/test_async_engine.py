"""The asyncio engine: streaming deltas, concurrency, aborts, failures."""

from __future__ import annotations

import asyncio

import pytest

from jserve import CapacityError, InvalidRequestError, SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.llm_engine import MAX_FAILED_STEPS
from jserve.errors import EngineDeadError, EngineStepError
from tests.engine.helpers import greedy, make_engine, run


@pytest.fixture
def aengine(tok_model_dir: str):
    eng = AsyncLLMEngine(make_engine(tok_model_dir))
    yield eng
    eng.shutdown()


async def _collect(aengine: AsyncLLMEngine, prompt, params, rid=None):
    ids, text, outs = [], "", []
    async for out in aengine.generate(prompt, params, rid):
        outs.append(out)
        ids += out.outputs[0].token_ids
        text += out.outputs[0].text
    return ids, text, outs


def test_stream_deltas_add_up_to_the_offline_result(aengine, tok_model_dir) -> None:
    sp = greedy(20)
    offline = run(make_engine(tok_model_dir), [("x", "First Citizen:", sp, 0)])["x"]
    ids, text, outs = asyncio.run(_collect(aengine, "First Citizen:", sp))
    assert ids == offline.outputs[0].token_ids
    assert text == offline.outputs[0].text
    assert len(outs) > 1 and outs[-1].finished
    assert outs[-1].outputs[0].finish_reason == "length"
    assert all(o.outputs[0].finish_reason is None for o in outs[:-1])


def test_many_concurrent_streams(aengine) -> None:
    async def main():
        prompts = [f"All: {i}" for i in range(20)]
        return await asyncio.gather(*(_collect(aengine, p, greedy(8)) for p in prompts))

    results = asyncio.run(main())
    assert all(len(ids) == 8 for ids, _, _ in results)
    assert aengine.wait_idle()


def test_leaving_early_aborts_and_frees_pages(aengine) -> None:
    async def main():
        gen = aengine.generate("First Citizen:", greedy(200), "early")
        async for _ in gen:
            break
        await gen.aclose()

    asyncio.run(main())
    assert aengine.wait_idle()
    assert aengine.engine.pool.num_used == 0
    assert aengine.get_stats().num_aborted == 1


def test_cancelled_task_aborts(aengine) -> None:
    started = asyncio.Event()

    async def consume():
        async for _ in aengine.generate("First Citizen:", greedy(400)):
            started.set()

    async def main():
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert aengine.wait_idle()
    assert aengine.engine.pool.num_used == 0


def test_bad_input_raises_before_streaming(aengine) -> None:
    async def main(params, prompt="x"):
        async for _ in aengine.generate(prompt, params):
            pass

    with pytest.raises(InvalidRequestError, match="top_p"):
        asyncio.run(main(SamplingParams(top_p=2.0)))
    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(main(greedy(2), ""))
    # The engine keeps serving.
    ids, _, _ = asyncio.run(_collect(aengine, "All:", greedy(3)))
    assert len(ids) == 3


def test_queue_full_is_a_capacity_error(tok_model_dir) -> None:
    eng = AsyncLLMEngine(make_engine(tok_model_dir, max_waiting=1, max_num_seqs=1))

    async def main():
        running = asyncio.Event()

        async def first():
            async for _ in eng.generate("All:", greedy(60)):
                running.set()

        t1 = asyncio.create_task(first())
        await running.wait()  # the only sequence slot is taken
        t2 = asyncio.create_task(_collect(eng, "All:", greedy(5)))  # waits in the queue
        while eng.get_stats().num_waiting < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(CapacityError, match="queue is full"):
            await _collect(eng, "All:", greedy(5))
        await asyncio.gather(t1, t2)

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_engine_failure_fails_requests_and_later_adds(tok_model_dir) -> None:
    engine = make_engine(tok_model_dir)
    eng = AsyncLLMEngine(engine)

    def broken(plan):
        raise RuntimeError("device lost")

    engine.runner.dispatch = broken
    try:
        # Each failed step fails its request and the engine tries again (see
        # tests/engine/test_recovery.py), until steps fail MAX_FAILED_STEPS times in a row.
        for _ in range(MAX_FAILED_STEPS):
            with pytest.raises(EngineStepError, match="device lost"):
                asyncio.run(_collect(eng, "All:", greedy(5)))
        with pytest.raises(EngineDeadError, match="device lost"):
            asyncio.run(_collect(eng, "All:", greedy(5)))
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(eng, "All:", greedy(5)))
    finally:
        eng.shutdown()


def test_cancel_before_admission_never_admits(tok_model_dir) -> None:
    import threading

    engine = make_engine(tok_model_dir)
    gate = threading.Event()
    real_step = engine.step

    def gated_step():  # the step thread waits here, so adds stay queued
        gate.wait()
        return real_step()

    engine.step = gated_step
    eng = AsyncLLMEngine(engine)

    async def main():
        busy = asyncio.create_task(_collect(eng, "All:", greedy(5)))
        while engine.stats.num_requests < 1:
            await asyncio.sleep(0.005)
        task = asyncio.create_task(_collect(eng, "First Citizen:", greedy(50)))
        while eng._commands.empty():  # the add is queued behind the blocked step
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await busy

    try:
        asyncio.run(main())
        assert eng.wait_idle()
        assert engine.stats.num_requests == 1  # the cancelled add was dropped, not admitted
        assert eng.dead is None and engine.pool.num_used == 0
    finally:
        gate.set()
        eng.shutdown()


def test_cancel_during_admission_aborts_the_admitted_request(tok_model_dir) -> None:
    import threading

    engine = make_engine(tok_model_dir)
    entered, release = threading.Event(), threading.Event()
    real_add = engine.add_request

    def slow_add(*args, **kwargs):  # the caller gives up while its add is being taken
        entered.set()
        release.wait()
        return real_add(*args, **kwargs)

    engine.add_request = slow_add
    eng = AsyncLLMEngine(engine)

    async def main():
        task = asyncio.create_task(_collect(eng, "First Citizen:", greedy(300), "x"))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    try:
        asyncio.run(main())
        assert eng.wait_idle()
        assert engine.stats.num_requests == 1 and engine.stats.num_aborted == 1
        assert eng.dead is None and engine.pool.num_used == 0
    finally:
        release.set()
        eng.shutdown()


def test_any_64_bit_seed_is_accepted(aengine) -> None:
    for seed in (-1, 2**40 + 5, 2**64 - 1):
        ids, _, _ = asyncio.run(_collect(aengine, "All:", SamplingParams(max_tokens=3, seed=seed)))
        assert len(ids) == 3
    with pytest.raises(InvalidRequestError, match="64 bits"):
        asyncio.run(_collect(aengine, "All:", SamplingParams(max_tokens=3, seed=2**64)))
