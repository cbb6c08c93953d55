"""Random workloads under page pressure: every request ends, nothing leaks."""

from __future__ import annotations

import random

import pytest

from jserve.outputs import RequestOutput, merge_delta
from jserve.sampling_params import SamplingParams
from tests.engine.helpers import make_engine


@pytest.mark.parametrize("prompt_logprobs", [False, True])
@pytest.mark.parametrize(
    "seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6))]
)
def test_random_workload_with_aborts_and_preemption(
    llama_dir: str, seed: int, prompt_logprobs: bool
) -> None:
    rng = random.Random(seed)
    engine = make_engine(
        llama_dir, num_pages=40, max_num_seqs=6, max_num_batched_tokens=24, max_logprobs=3
    )
    live: set[str] = set()
    finished: dict[str, str] = {}
    results: dict[str, RequestOutput] = {}
    scoring: set[str] = set()  # requests with prompt logprobs
    next_id = 0
    for step in range(400):
        if step < 250 and rng.random() < 0.3:
            rid = f"r{next_id}"
            next_id += 1
            prompt = [rng.randrange(1, 256) for _ in range(rng.randint(1, 50))]
            sp = SamplingParams(
                n=rng.choice([1, 1, 2, 3]),
                max_tokens=rng.randint(1, 20),
                temperature=rng.choice([0.0, 0.7, 1.2]),
                top_p=rng.choice([1.0, 0.8]),
                stop_token_ids=[rng.randrange(256)] if rng.random() < 0.3 else [],
                logprobs=rng.choice([None, 2]),
                presence_penalty=rng.choice([0.0, 0.0, 1.0]),
                ignore_eos=True,
            )
            if prompt_logprobs and rng.random() < 0.5:
                sp.prompt_logprobs = rng.choice([0, 3])
                sp.max_tokens = rng.choice([0, sp.max_tokens])
                scoring.add(rid)
            engine.add_request(rid, prompt, sp, priority=rng.randint(0, 2))
            live.add(rid)
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
        for out in engine.step():
            results[out.request_id] = merge_delta(results.get(out.request_id), out)
            if out.finished:
                live.discard(out.request_id)
                reasons = {c.finish_reason for c in out.outputs}
                finished[out.request_id] = ",".join(sorted(r or "?" for r in reasons))
        if step >= 250 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "requests still running"
    assert live == set()
    assert len(finished) == next_id
    assert all("?" not in reasons for reasons in finished.values()), finished
    assert engine.pool.num_used == 0
    assert all(c == 0 for c in engine.pool.ref_count)
    # Page-table rows of the last finished sequences are freed with the next step.
    assert set(engine.runner.inputs.rows) <= set(engine.scheduler.pending_releases)
    assert engine.stats.preemptions > 0
    # Every request that was not aborted has each prompt position scored once.
    assert len(scoring) > 10 or not prompt_logprobs
    for rid, res in results.items():
        plp = res.prompt_logprobs
        if rid not in scoring:
            assert plp is None
        elif "abort" not in finished[rid]:
            ids = res.prompt_token_ids
            assert plp is not None and len(plp) == len(ids) and plp[0] is None
            assert all(ids[i] in plp[i] for i in range(1, len(ids)))
