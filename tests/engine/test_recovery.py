"""Chaos: a step that raises fails only the requests in it, frees their pages, and the
engine serves the next requests with the tokens a clean engine gives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jserve import LLM, EngineStepError, SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.llm_engine import MAX_FAILED_STEPS, LLMEngine
from jserve.errors import EngineDeadError
from tests.engine.helpers import greedy, make_engine, run

PROMPTS = [[5, 17, 200, 3, 9], [42, 7], list(range(1, 30))]


class Fault:
    """Makes one runner method raise on its ``after``-th call (once), optionally after
    running for real (the device work happened and its donated buffers are gone)."""

    def __init__(self, runner: Any, name: str, after: int = 1, run_first: bool = False) -> None:
        self.runner, self.name, self.after, self.run_first = runner, name, after, run_first
        self.real = getattr(runner, name)
        self.calls = 0
        self.fired = False
        setattr(runner, name, self)

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.fired or self.calls < self.after:
            return self.real(*args)
        self.fired = True
        if self.run_first:
            self.real(*args)
            for pages in self.runner.kv_pages:
                pages.delete()
        raise RuntimeError(f"injected fault in {self.name}")


@pytest.fixture(scope="module")
def engines(tok_model_dir: str) -> dict[bool, LLMEngine]:
    # max_num_seqs 2: of three prompts, the third waits while the first two run.
    return {
        a: make_engine(tok_model_dir, max_num_seqs=2, async_scheduling=a) for a in (True, False)
    }


@pytest.fixture(scope="module")
def reference(engines: dict[bool, LLMEngine]) -> list[list[int]]:
    res = run(engines[False], [(str(i), p, greedy(6), 0) for i, p in enumerate(PROMPTS)])
    return [res[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))]


def _drive(engine: LLMEngine) -> tuple[dict, dict]:
    outs: dict[str, Any] = {}
    errors: dict[str, EngineStepError] = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
        errors.update(engine.step_errors)
    assert not engine.has_unfinished_requests()
    return outs, errors


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize(
    ("method", "after", "run_first"),
    [
        ("prepare", 1, False),  # host input building, before the device is touched
        ("prepare", 3, False),  # mid-decode
        ("dispatch", 2, True),  # the device ran and its donated KV pages are gone
        ("fetch", 2, False),  # the device work failed when its tokens were read
    ],
)
def test_a_failed_step_fails_only_its_requests_and_the_engine_serves_on(
    engines, reference, async_scheduling: bool, method: str, after: int, run_first: bool
) -> None:
    engine = engines[async_scheduling]
    fault = Fault(engine.runner, method, after, run_first)
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"{method}-{i}", p, greedy(6))
        outs, errors = _drive(engine)
    finally:
        setattr(engine.runner, method, fault.real)
    assert fault.fired
    # The two running requests failed: aborted, with the error for their callers.
    for i in (0, 1):
        rid = f"{method}-{i}"
        assert rid in errors and "injected fault" in str(errors[rid])
        assert outs[rid][-1].finished and outs[rid][-1].outputs[0].finish_reason == "abort"
    # The waiting one held no device state: it ran, with the clean engine's tokens.
    waiting = outs[f"{method}-2"]
    assert f"{method}-2" not in errors
    assert [t for o in waiting for t in o.outputs[0].token_ids] == reference[2]
    assert engine.is_idle()  # every page free, nothing in flight
    # Next requests: the same tokens as before the fault.
    res = run(engine, [(f"{method}-again-{i}", p, greedy(6), 0) for i, p in enumerate(PROMPTS)])
    assert [res[f"{method}-again-{i}"].outputs[0].token_ids for i in range(3)] == reference
    assert engine.is_idle()


def test_the_reported_overflow_no_longer_wedges_the_engine(engines, reference) -> None:
    """A value past int32 in a device field (as top_k=2**31 once passed validation):
    the step fails, its request with it, and the engine is not wedged."""
    engine = engines[True]
    bad = greedy(6)
    bad.top_k = 2**31  # past validation, as before the int32 check
    engine.enqueue("overflow", None, [1, 2, 3], bad)
    _, errors = _drive(engine)
    assert "OverflowError" in str(errors["overflow"])
    assert engine.is_idle()
    res = run(engine, [("after", PROMPTS[0], greedy(6), 0)])
    assert res["after"].outputs[0].token_ids == reference[0]


def test_steps_failing_every_time_end_the_engine(tok_model_dir: str) -> None:
    engine = make_engine(tok_model_dir, max_num_seqs=2)

    def broken(*args: Any) -> Any:
        raise RuntimeError("the device is gone")

    engine.runner.prepare = broken
    for i in range(MAX_FAILED_STEPS):
        engine.add_request(str(i), [1, 2], greedy(2))
        engine.step()
        assert str(i) in engine.step_errors
    engine.add_request("last", [1, 2], greedy(2))
    with pytest.raises(EngineDeadError, match="the device is gone"):
        engine.step()


def test_a_runner_that_cannot_reset_fails_the_engine(tok_model_dir: str) -> None:
    """Multi-host followers replay the leader's steps and cannot be reset with it."""
    engine = make_engine(tok_model_dir, max_num_seqs=2)
    Fault(engine.runner, "prepare")
    engine.runner.can_reset = False
    engine.add_request("x", [1, 2], greedy(2))
    with pytest.raises(EngineDeadError, match="injected fault"):
        engine.step()


def test_llm_generate_raises_for_the_failed_prompts_then_serves(tok_model_dir: str) -> None:
    llm = LLM(
        model=tok_model_dir,
        dtype="float32",
        page_size=4,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        warmup=False,
    )
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    fault = Fault(llm.engine.runner, "fetch", after=2)
    with pytest.raises(EngineStepError, match=r"2 of 3 prompts failed.*injected fault") as info:
        llm.generate(PROMPTS, sp, use_tqdm=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert fault.fired and llm.engine.is_idle()
    after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert after == before


def test_async_engine_raises_to_the_failed_streams_and_serves_on(tok_model_dir: str) -> None:
    engine = make_engine(tok_model_dir, max_num_seqs=2)
    aengine = AsyncLLMEngine(engine)

    async def collect(prompt: list[int]) -> list[int] | BaseException:
        ids: list[int] = []
        try:
            async for out in aengine.generate(prompt, greedy(6)):
                ids += out.outputs[0].token_ids
        except EngineStepError as e:
            return e
        return ids

    async def batch() -> list:
        return await asyncio.gather(*(collect(p) for p in PROMPTS))

    try:
        before = asyncio.run(batch())
        assert all(isinstance(r, list) for r in before)
        fault = Fault(engine.runner, "fetch", after=3)
        during = asyncio.run(batch())
        assert fault.fired
        failed = [r for r in during if isinstance(r, EngineStepError)]
        assert len(failed) == 2 and "injected fault" in str(failed[0])
        assert during[2] == before[2]  # it waited for a free row: untouched by the fault
        assert aengine.dead is None and aengine.wait_idle()
        assert asyncio.run(batch()) == before
    finally:
        aengine.shutdown()


def test_a_failure_while_collecting_outputs_fails_the_touched_requests(
    engines, reference, monkeypatch
) -> None:
    from jserve.engine.detokenizer import SequenceDetokenizer

    engine = engines[True]
    real = SequenceDetokenizer.take_delta
    calls = {"n": 0}

    def take_delta(self: SequenceDetokenizer, finished: bool) -> str:
        calls["n"] += 1
        if calls["n"] == 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, finished)

    monkeypatch.setattr(SequenceDetokenizer, "take_delta", take_delta)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"collect-{i}", p, greedy(6))
    outs, errors = _drive(engine)
    assert {"collect-0", "collect-1"} <= set(errors)
    assert all(outs[rid][-1].finished for rid in outs)
    assert engine.is_idle()
    monkeypatch.setattr(SequenceDetokenizer, "take_delta", real)
    res = run(engine, [("collect-after", PROMPTS[1], greedy(6), 0)])
    assert res["collect-after"].outputs[0].token_ids == reference[1]
