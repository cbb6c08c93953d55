"""Engine behaviour the server relies on, found broken by the server's soak test.

These are engine bugs (jserve/engine is not the server's to change); each test
is a strict xfail naming the fix, so it fails loudly once the engine is fixed
and the mark should go.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from jserve import InvalidRequestError, SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from tests.engine.helpers import make_engine


@pytest.mark.timeout(120)
@pytest.mark.xfail(
    strict=True,
    reason="engine bug: LLMEngine.step() skips runner.execute() for an empty plan and so "
    "drops SchedulerOutput.released; page-table rows leak until InputBuilder._row_of pops "
    "from an empty list and the engine dies. Fix: deliver released ids of empty plans too.",
)
def test_page_table_rows_are_not_leaked_by_aborts(tok_model_dir: str) -> None:
    eng = make_engine(tok_model_dir, page_size=4, num_pages=256, max_num_seqs=4)
    rows = eng.runner.inputs
    rng = random.Random(0)
    live: set[str] = set()
    for i in range(300):
        if len(live) < 3:
            sp = SamplingParams(max_tokens=rng.randint(1, 4), temperature=0.0, ignore_eos=True)
            eng.add_request(f"r{i}", [1, 2, 3], sp)
            live.add(f"r{i}")
        if live and rng.random() < 0.3:
            eng.abort_request(rng.choice(sorted(live)))
        for out in eng.step():
            if out.finished:
                live.discard(out.request_id)
        held = {seq.seq_id for seq in eng.scheduler.running}
        stale = set(rows.rows) - held - set(eng.scheduler._released)
        assert not stale, f"step {i}: rows of ended sequences {sorted(stale)} never freed"


@pytest.mark.xfail(
    strict=True,
    reason="engine bug: SamplingParams.validate accepts any integer seed, but seeds outside "
    "[0, 2**32) crash the step (OverflowError casting to uint32) and so kill the async "
    "engine. The server checks the range itself (convert.sampling_params).",
)
def test_seed_range_is_validated() -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(seed=-1).validate()


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.xfail(
    strict=True,
    reason="engine bug: cancelling AsyncLLMEngine.generate() while it awaits admission "
    "cancels the concurrent future the step thread then completes; set_result raises "
    "InvalidStateError, which kills the step thread without marking the engine dead, and "
    "the admitted request is never aborted. The server never cancels an engine stream "
    "(servicers.EngineStream). Fix: skip cancelled futures in _drain_commands (and abort "
    "the request), and abort on CancelledError in generate().",
)
def test_cancel_during_admission_keeps_the_engine_alive(tok_model_dir: str) -> None:
    eng = make_engine(tok_model_dir, page_size=4, num_pages=256, max_num_seqs=4)
    aeng = AsyncLLMEngine(eng)
    real_step = eng.step

    def slow_step():  # admissions wait for the end of a step
        time.sleep(0.05)
        return real_step()

    eng.step = slow_step
    greedy = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def consume(gen) -> None:
        async for _ in gen:
            pass

    async def main() -> None:
        busy = asyncio.create_task(consume(aeng.generate([1, 2, 3], greedy)))
        await asyncio.sleep(0.2)
        for _ in range(5):
            task = asyncio.create_task(consume(aeng.generate([1, 2], greedy)))
            await asyncio.sleep(0.005)  # the add is sent; admission is pending
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)

    try:
        asyncio.run(main())
        time.sleep(0.3)
        assert aeng._thread.is_alive() and aeng.dead is None
        assert aeng.wait_idle(10) and eng.pool.num_used == 0
    finally:
        aeng.shutdown(2)
