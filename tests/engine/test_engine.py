"""Continuous batching end to end on a tiny model: equal tokens under every schedule."""

from __future__ import annotations

import random

import pytest

from jserve import InvalidRequestError, RequestTooLargeError, SamplingParams
from tests.engine.helpers import greedy, make_engine, run
from tests.hf_models import hf_greedy

rng = random.Random(0)
PROMPTS = [[rng.randrange(1, 256) for _ in range(n)] for n in (5, 37, 1, 18, 60, 9, 23, 3)]


@pytest.fixture(scope="module")
def alone(llama_dir: str) -> dict[int, list[int]]:
    """Each prompt's greedy tokens when it runs by itself."""
    engine = make_engine(llama_dir)
    out = {}
    for i, p in enumerate(PROMPTS):
        res = run(engine, [(str(i), p, greedy(12), 0)])
        out[i] = res[str(i)].outputs[0].token_ids
    return out


def test_alone_matches_transformers(llama_dir: str, alone: dict[int, list[int]]) -> None:
    for i in (0, 2, 4):
        assert alone[i] == hf_greedy(llama_dir, PROMPTS[i], 12)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_staggered_arrivals_match_running_alone(
    llama_dir: str, alone: dict[int, list[int]], async_scheduling: bool
) -> None:
    engine = make_engine(llama_dir, async_scheduling=async_scheduling)
    reqs = [(str(i), p, greedy(12), i * 3 % 7) for i, p in enumerate(PROMPTS)]
    res = run(engine, reqs)
    for i in range(len(PROMPTS)):
        assert res[str(i)].outputs[0].token_ids == alone[i], i
        assert res[str(i)].outputs[0].finish_reason == "length"
    assert engine.is_idle()


def test_chunked_prefill_matches_whole_prompt(llama_dir: str, alone: dict[int, list[int]]) -> None:
    # A budget of 8 tokens splits the 60-token prompt over many steps.
    engine = make_engine(llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    reqs = [(str(i), PROMPTS[i], greedy(12), 0) for i in (1, 4, 3)]
    res = run(engine, reqs)
    for i in (1, 4, 3):
        assert res[str(i)].outputs[0].token_ids == alone[i]
    assert engine.stats.num_steps > 60 // 8


def test_prefix_cache_reuses_shared_prefix(llama_dir: str) -> None:
    engine = make_engine(llama_dir)
    prefix = PROMPTS[4][:40]
    first = run(engine, [("a", [*prefix, 7, 8, 9], greedy(6), 0)])["a"]
    before = engine.stats.scheduled_tokens
    second = run(engine, [("b", [*prefix, 7, 8, 9], greedy(6), 0)])["b"]
    # 43-token prompt, page size 4: 40 tokens (10 full pages) come from the
    # cache; 3 prompt tokens and 5 decode inputs are computed.
    assert second.num_cached_tokens == 40
    assert engine.stats.scheduled_tokens - before == 3 + 5
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # A different suffix reuses the same pages and matches an uncached run.
    other = run(engine, [("c", [*prefix, 10, 11], greedy(6), 0)])["c"]
    assert other.num_cached_tokens == 40
    fresh = make_engine(llama_dir, enable_prefix_caching=False)
    uncached = run(fresh, [("c", [*prefix, 10, 11], greedy(6), 0)])["c"]
    assert uncached.num_cached_tokens == 0
    assert uncached.outputs[0].token_ids == other.outputs[0].token_ids
    assert engine.stats.prefix_cache_hits == 80


def test_pool_pressure_preempts_and_completes_without_leaks(
    llama_dir: str, alone: dict[int, list[int]]
) -> None:
    # 24 pages of 4 tokens cannot hold 8 sequences of up to 72 tokens at once.
    engine = make_engine(llama_dir, num_pages=24, enable_prefix_caching=False)
    reqs = [(str(i), p, greedy(12), 0) for i, p in enumerate(PROMPTS)]
    res = run(engine, reqs)
    assert engine.stats.preemptions > 0
    for i in range(len(PROMPTS)):
        assert res[str(i)].outputs[0].token_ids == alone[i]
    assert engine.pool.num_free == engine.pool.num_pages
    assert engine.is_idle()


def test_abort_frees_pages_within_one_step(llama_dir: str) -> None:
    engine = make_engine(llama_dir)
    engine.add_request("x", PROMPTS[4], greedy(40))
    engine.add_request("y", PROMPTS[1], greedy(40))
    for _ in range(3):
        engine.step()
    used = engine.pool.num_used
    assert used > 0
    engine.abort_request("x")
    assert engine.pool.num_used < used
    outs = {o.request_id: o for o in engine.step()}
    assert outs["x"].finished and outs["x"].outputs[0].finish_reason == "abort"
    engine.abort_request("y")
    engine.step()
    engine.step()
    assert engine.pool.num_used == 0
    assert not engine.has_unfinished_requests()


def test_n_samples_share_prompt_pages(llama_dir: str) -> None:
    sp = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    out = run(make_engine(llama_dir), [("n", PROMPTS[1], sp, 0)])["n"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 10 for s in samples)
    assert len(set(samples)) > 1  # different samples from one prompt
    # Same seed, same samples; the prompt was computed once, then 9 decodes each.
    engine2 = make_engine(llama_dir)
    again = run(engine2, [("n", PROMPTS[1], sp, 0)])["n"]
    assert [tuple(c.token_ids) for c in again.outputs] == samples
    assert engine2.stats.scheduled_tokens == 37 + 3 * 9
    assert engine2.is_idle()


def test_stop_conditions(tok_model_dir: str) -> None:
    engine = make_engine(tok_model_dir)
    tok = engine.tokenizer
    prompt = "First Citizen:"
    base = run(engine, [("a", prompt, greedy(24), 0)])["a"].outputs[0]
    assert len(base.token_ids) == 24 and base.text == tok.decode(base.token_ids)
    # stop_token_ids: stops at the first occurrence, which is included in token_ids.
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    out = run(engine, [("b", prompt, greedy(24, stop_token_ids=[target]), 0)])["b"].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # A stop string is cut from the text.
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    out = run(engine, [("c", prompt, greedy(24, stop=[stop]), 0)])["c"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    out = run(engine, [("d", prompt, greedy(24, stop=[stop], include_stop_str_in_output=True), 0)])[
        "d"
    ].outputs[0]
    assert out.text == base.text[: base.text.index(stop) + len(stop)]
    # min_tokens holds back stop tokens; max_tokens ends with "length".
    out = run(
        engine, [("e", prompt, greedy(24, stop_token_ids=[target], min_tokens=first + 2), 0)]
    )["e"].outputs[0]
    assert target not in out.token_ids[: first + 2]
    # Below min_tokens a stop string is not looked for, and the text is not cut there.
    done = next(k for k in range(1, 25) if stop in tok.decode(base.token_ids[:k]))
    out = run(engine, [("g", prompt, greedy(24, stop=[stop], min_tokens=done + 1), 0)])["g"]
    text = out.outputs[0].text
    assert base.text.startswith(text) and len(text) > base.text.index(stop)
    assert text == tok.decode(out.outputs[0].token_ids)[: len(text)]
    out = run(engine, [("f", prompt, greedy(3), 0)])["f"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_eos_stops_unless_ignored(llama_dir: str) -> None:
    import dataclasses

    from jserve.engine.config import EngineConfig
    from jserve.engine.llm_engine import LLMEngine
    from tests.engine.helpers import loaded

    base = run(make_engine(llama_dir), [("a", PROMPTS[3], greedy(16), 0)])["a"].outputs[0]
    eos = base.token_ids[4]
    first = base.token_ids.index(eos)
    model = loaded(llama_dir)
    model = dataclasses.replace(model, cfg=model.cfg.replace(eos_token_ids=(eos,)))
    engine = LLMEngine(model, EngineConfig(page_size=4, max_num_seqs=8), warmup=False)
    sp = SamplingParams(max_tokens=16, temperature=0.0)
    out = run(engine, [("b", PROMPTS[3], sp, 0)])["b"].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    out = run(engine, [("c", PROMPTS[3], greedy(16), 0)])["c"].outputs[0]
    assert out.token_ids == base.token_ids
    # min_tokens bans eos until enough tokens are out.
    sp = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=first + 1)
    out = run(engine, [("d", PROMPTS[3], sp, 0)])["d"].outputs[0]
    assert eos not in out.token_ids[: first + 1]
    assert len(out.token_ids) > first + 1


def test_logprobs(llama_dir: str) -> None:
    engine = make_engine(llama_dir, max_logprobs=5)
    out = run(engine, [("a", PROMPTS[0], greedy(5, logprobs=3), 0)])["a"].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert len(lp) == 3
        ranks = sorted(x.rank for x in lp.values())
        assert ranks == [1, 2, 3]
        total += lp[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        engine.add_request("b", PROMPTS[0], greedy(5, logprobs=6))


BAD = [
    ([], {}, "empty"),
    ([1, 300], {}, "outside the vocabulary"),
    ([1] * 500, {"max_tokens": 20}, "maximum length"),
    ([1], {"temperature": -0.5}, "temperature"),
    ([1], {"temperature": float("nan")}, "temperature"),
    ([1], {"top_p": 0.0}, "top_p"),
    ([1], {"top_p": 1.5}, "top_p"),
    ([1], {"min_p": 1.5}, "min_p"),
    ([1], {"top_k": 0}, "top_k"),
    ([1], {"top_k": -2}, "top_k"),
    ([1], {"repetition_penalty": 0.0}, "repetition_penalty"),
    ([1], {"presence_penalty": 3.0}, "presence_penalty"),
    ([1], {"frequency_penalty": -2.5}, "frequency_penalty"),
    ([1], {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ([1], {"n": 0}, "n must be"),
    ([1], {"logprobs": 50}, "logprobs"),
    ([1], {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("prompt", "kw", "pattern"), BAD)
def test_bad_requests_raise_before_any_state_change(
    llama_dir: str, prompt: list[int], kw: dict, pattern: str
) -> None:
    engine = make_engine(llama_dir)
    engine.add_request("ok", [1, 2, 3], greedy(2))
    before = (len(engine.scheduler.waiting), engine.pool.num_used, set(engine.requests))
    with pytest.raises(InvalidRequestError, match=pattern):
        engine.add_request("bad", prompt, SamplingParams(**kw))
    assert before == (len(engine.scheduler.waiting), engine.pool.num_used, set(engine.requests))
    run(engine, [])
    assert engine.is_idle()


def test_request_that_never_fits_is_rejected(llama_dir: str) -> None:
    engine = make_engine(llama_dir, num_pages=8)
    with pytest.raises(RequestTooLargeError, match="could never run"):
        engine.add_request("big", [1] * 30, greedy(10))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [1], greedy(1))
        engine.add_request("dup", [1], greedy(1))


def test_priority_orders_admission_and_is_validated(llama_dir: str) -> None:
    # One sequence slot: requests run one at a time, lowest priority value first.
    engine = make_engine(llama_dir, max_num_seqs=1, max_num_batched_tokens=16)
    order: list[str] = []
    for rid, prio in (("low", 5), ("high", -1), ("mid", 2)):
        engine.add_request(rid, [1, 2, 3], greedy(2), priority=prio)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "mid", "low"]
    with pytest.raises(InvalidRequestError, match="priority"):
        engine.add_request("bad", [1], greedy(1), priority="urgent")
    assert engine.is_idle()
