"""Helpers to drive an LLMEngine step by step in tests."""

from __future__ import annotations

import functools
from typing import Any

from jserve.engine.config import EngineConfig
from jserve.engine.llm_engine import LLMEngine
from jserve.model_loader import LoadedModel, load_model
from jserve.outputs import RequestOutput, merge_delta
from jserve.sampling_params import SamplingParams


@functools.cache
def loaded(model_dir: str, dtype: str = "float32") -> LoadedModel:
    return load_model(model_dir, dtype)


def make_engine(model_dir: str, warmup: bool = False, **kw: Any) -> LLMEngine:
    defaults: dict[str, Any] = dict(page_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    return LLMEngine(loaded(model_dir), EngineConfig(**{**defaults, **kw}), warmup=warmup)


def run(
    engine: LLMEngine,
    requests: list[tuple[str, Any, SamplingParams, int]],
    max_steps: int = 10_000,
    deltas: list[RequestOutput] | None = None,
) -> dict[str, RequestOutput]:
    """Adds each (id, prompt, params, arrival_step) at its step; runs until all finish.
    ``deltas`` collects every incremental output as the engine gave it."""
    pending = sorted(requests, key=lambda r: r[3])
    results: dict[str, RequestOutput] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for delta in engine.step():
            if deltas is not None:
                deltas.append(delta)
            results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
        step += 1
        assert step < max_steps, "engine did not finish"
    return results


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
