"""Prompt logprobs end to end: a full forward's log-softmax under every schedule.

The reference is transformers' forward over the whole prompt; the engine scores
the prompt in chunks, beside other requests, from a prefix cache and after
preemption, and must give the same numbers, each position exactly once.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jserve import LLM, InvalidRequestError, SamplingParams
from jserve.engine.llm_engine import LLMEngine
from jserve.outputs import PromptLogprobs, RequestOutput
from tests.engine.helpers import greedy, make_engine, run
from tests.hf_models import hf_logits

rng = random.Random(14)
PROMPT = [rng.randrange(1, 256) for _ in range(50)]
OTHERS = [[rng.randrange(1, 256) for _ in range(n)] for n in (5, 37, 18, 60, 23, 30)]


@pytest.fixture(scope="module")
def engine(llama_dir: str) -> LLMEngine:
    """8 rows a step (so a long prompt is scored in chunks) and 40 pages of 4 tokens
    (so a few long requests preempt one another); every test leaves it idle."""
    return make_engine(llama_dir, num_pages=40)


def hf_logprobs(model_dir: str, prompt: list[int]) -> np.ndarray:
    """[L, V] log-softmax of transformers' logits over the whole prompt."""
    logits = hf_logits(model_dir, prompt).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def check(plp: PromptLogprobs | None, prompt: list[int], want: np.ndarray, k: int) -> None:
    """vLLM's shape: None first, then the prompt token (its own rank) plus the top k."""
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        row, tok, entry = want[i - 1], prompt[i], plp[i]
        assert entry is not None
        top = [int(t) for t in np.argsort(-row)[:k]]
        assert list(entry) == [tok] + [t for t in top if t != tok]
        assert entry[tok].rank == 1 + int((row > row[tok]).sum())
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t], abs=2e-4), (i, t)
            if t != tok:
                assert lp.rank == top.index(t) + 1


def test_a_chunked_prompt_scores_as_one_pass_and_as_a_full_forward(
    llama_dir: str, engine: LLMEngine
) -> None:
    want = hf_logprobs(llama_dir, PROMPT)
    sp = SamplingParams(max_tokens=0, prompt_logprobs=3)
    got = {}
    # One step (50 rows fit in 64), then chunks of at most 8 rows: 49 positions in 7.
    for name, eng in (("one", make_engine(llama_dir, max_num_seqs=64)), ("chunked", engine)):
        steps = eng.stats.num_steps
        out = run(eng, [("a", PROMPT, sp, 0)])["a"]
        assert eng.stats.num_steps - steps == (1 if name == "one" else 7)
        check(out.prompt_logprobs, PROMPT, want, 3)
        assert [(c.token_ids, c.text, c.finish_reason) for c in out.outputs] == [([], "", "length")]
        assert out.finished and eng.is_idle()
        got[name] = out.prompt_logprobs
    for a, b in zip(got["one"][1:], got["chunked"][1:], strict=True):
        assert list(a) == list(b) and [x.rank for x in a.values()] == [x.rank for x in b.values()]
        assert np.allclose(
            [x.logprob for x in a.values()], [x.logprob for x in b.values()], atol=1e-5
        )


def _mix() -> list[tuple[str, list[int], SamplingParams, int]]:
    return [
        ("g0", OTHERS[0], greedy(10), 0),
        ("g1", OTHERS[1], greedy(10), 1),
        ("g2", OTHERS[2], greedy(10, logprobs=2), 3),
        ("g3", OTHERS[3], greedy(10), 4),
        ("p1", OTHERS[4], greedy(6, logprobs=1), 2),
        ("p2", OTHERS[5], SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=5), 1),
    ]


def test_prompt_logprobs_beside_ordinary_requests_change_no_tokens(
    llama_dir: str, engine: LLMEngine
) -> None:
    base = run(engine, _mix())
    reqs = _mix()
    for i, (rid, prompt, sp, at) in enumerate(reqs):
        if rid.startswith("p"):
            reqs[i] = (rid, prompt, SamplingParams(**{**sp.__dict__, "prompt_logprobs": 2}), at)
    reqs.append(("p0", PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=3), 0))
    deltas: list[RequestOutput] = []
    out = run(engine, reqs, deltas=deltas)
    for rid, res in base.items():
        assert [c.token_ids for c in out[rid].outputs] == [c.token_ids for c in res.outputs]
        if rid == "g2" or rid == "p1":
            for a, b in zip(out[rid].outputs[0].logprobs, res.outputs[0].logprobs, strict=True):
                assert a.keys() == b.keys()
        assert res.prompt_logprobs is None
    assert len(out["p2"].outputs) == 2
    check(out["p0"].prompt_logprobs, PROMPT, hf_logprobs(llama_dir, PROMPT), 3)
    for rid, prompt in (("p1", OTHERS[4]), ("p2", OTHERS[5])):
        check(out[rid].prompt_logprobs, prompt, hf_logprobs(llama_dir, prompt), 2)
    # A stream carries each request's prompt logprobs once, whole.
    carried = [d.request_id for d in deltas if d.prompt_logprobs is not None]
    assert sorted(carried) == ["p0", "p1", "p2"]
    assert engine.is_idle()


def test_a_cached_prefix_is_scored_again(llama_dir: str, engine: LLMEngine) -> None:
    assert engine.ecfg.enable_prefix_caching
    run(engine, [("warm", PROMPT, greedy(2), 0)])
    sp = SamplingParams(max_tokens=0, prompt_logprobs=2)
    out = run(engine, [("p", PROMPT, sp, 0)])["p"]
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, PROMPT, hf_logprobs(llama_dir, PROMPT), 2)
    # Requests without prompt logprobs still reuse the pages.
    again = run(engine, [("again", PROMPT, greedy(2), 0)])["again"]
    assert again.num_cached_tokens == 48


def test_preemption_neither_loses_nor_repeats_positions(llama_dir: str, engine: LLMEngine) -> None:
    # The scoring request starts first; three decoders join and the 40 pages run
    # short while it is mid-prompt: it is the victim (priority 1) and is recomputed.
    decoders = [(f"d{i}", OTHERS[i], greedy(24), 1) for i in (1, 2, 3)]
    alone = run(engine, decoders)
    sp = SamplingParams(n=2, max_tokens=3, temperature=0, prompt_logprobs=1)
    req = engine.add_request("p", PROMPT, sp, priority=1)
    out = run(engine, decoders)
    assert req.seqs[0].num_preemptions > 0
    check(out["p"].prompt_logprobs, PROMPT, hf_logprobs(llama_dir, PROMPT), 1)
    for rid, *_ in decoders:
        assert out[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    assert engine.is_idle()


def test_max_tokens_zero_scores_only_and_is_refused_without_prompt_logprobs(
    engine: LLMEngine,
) -> None:
    sp = SamplingParams(max_tokens=0, prompt_logprobs=0, n=3, temperature=1.0)
    out = run(engine, [("a", PROMPT[:9], sp, 0), ("one", [7], sp, 0)])
    assert [(c.index, c.token_ids, c.finish_reason) for c in out["a"].outputs] == [
        (i, [], "length") for i in range(3)
    ]
    assert [len(e or ()) for e in out["a"].prompt_logprobs] == [0] + [1] * 8
    assert out["one"].prompt_logprobs == [None]
    for kw, field in (
        (dict(max_tokens=0), "max_tokens"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(prompt_logprobs=True), "prompt_logprobs"),
        (dict(max_tokens=-1, prompt_logprobs=1), "max_tokens"),
    ):
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request("bad", [1, 2], SamplingParams(**kw))
    assert engine.is_idle()


def test_llm_generate_returns_decoded_prompt_logprobs(tok_model_dir: str) -> None:
    llm = LLM(
        tok_model_dir,
        "float32",
        page_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        warmup=False,
        compilation_cache_dir=None,
    )
    tok = llm.get_tokenizer()
    text = "To be, or not to be, that is the question"
    sp = [SamplingParams(max_tokens=0, prompt_logprobs=2), greedy(4, prompt_logprobs=1)]
    outs = llm.generate([text, text], sp, use_tqdm=False)
    ids = outs[0].prompt_token_ids
    want = hf_logprobs(tok_model_dir, ids)
    check(outs[0].prompt_logprobs, ids, want, 2)
    check(outs[1].prompt_logprobs, ids, want, 1)
    for entry in outs[0].prompt_logprobs[1:]:
        for t, lp in entry.items():
            assert lp.decoded_token == tok.decode([t], skip_special_tokens=False)
    assert outs[0].outputs[0].text == "" and len(outs[1].outputs[0].token_ids) == 4
