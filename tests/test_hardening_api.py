"""The Python API under hostile input: vLLM's dict prompts, non-prompts, and sampling
parameters past what the device arrays hold, all typed errors before any state changes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jserve import LLM, InvalidRequestError, SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
TEXT = "First Citizen:"


def _tokens(out) -> list[int]:
    return out.outputs[0].token_ids


def test_vllm_dict_prompts_mean_what_they_say(tok_llm: LLM) -> None:
    ids = tok_llm.get_tokenizer().encode(TEXT)
    plain = tok_llm.generate([TEXT, ids], GREEDY, use_tqdm=False)
    outs = tok_llm.generate(
        [{"prompt": TEXT}, {"prompt_token_ids": ids}, {"prompt_token_ids": np.array(ids)}],
        GREEDY,
        use_tqdm=False,
    )
    assert outs[0].prompt == TEXT and outs[0].prompt_token_ids == ids
    assert outs[1].prompt is None and outs[1].prompt_token_ids == ids
    assert [_tokens(o) for o in outs] == [_tokens(plain[0]), _tokens(plain[1]), _tokens(plain[1])]
    # A single dict is one prompt, as a single string is.
    (one,) = tok_llm.generate({"prompt": TEXT}, GREEDY, use_tqdm=False)
    assert _tokens(one) == _tokens(plain[0])


NOT_PROMPTS = [
    (b"First", r"got bytes"),
    (bytearray(b"First"), r"got bytearray"),
    (None, r"got None"),
    (5, r"got int"),
    ({1, 2}, r"got set"),
    ([None], r"prompt must be a string.*got None"),
    (["a", None], r"prompts\[1\]: .*got None"),
    ([[1, 2], b"x"], r"prompts\[1\]: .*got bytes"),
    ("\ud800abc", r"prompt is not valid Unicode: '\\ud800' at index 0 is a lone surrogate"),
    ({"prompt": "ab\udfffc"}, r"prompt\['prompt'\] is not valid Unicode"),
    ({"prompt": 5}, r"prompt\['prompt'\] must be a string, got int"),
    ({"prompt": ""}, r"prompt\['prompt'\] is empty"),
    ({"prompt_token_ids": "abc"}, r"prompt\['prompt_token_ids'\] must be a list of token ids"),
    ({"prompt_token_ids": [1, 2.5]}, r"prompt\['prompt_token_ids'\] token ids must be integers"),
    ({"prompt_token_ids": []}, r"empty"),
    ({"prompt_token_ids": [1, 10_000]}, r"token id 10000 is outside the vocabulary"),
    ({"foo": "bar"}, r"exactly one key.*\['foo'\]"),
    ({"prompt": "a", "prompt_token_ids": [1]}, r"exactly one key"),
    ({"prompt": "a", "multi_modal_data": {}}, r"multi_modal_data is not supported"),
    ({"prompt": "a", "cache_salt": "x"}, r"cache_salt is not supported"),
    ([1.5, 2.0], r"got float"),
    ([[1, 2.0]], r"token ids must be integers, got float 2\.0"),
    ([[True, False]], r"token ids must be integers, got bool"),
    ([["1", 2]], r"token ids must be integers, got str"),
    (np.zeros((2, 2, 2), np.int32), r"1-D .* or 2-D"),
    (np.array([1.0, 2.0]), r"got ndarray"),
]


@pytest.mark.parametrize(
    ("prompt", "pattern"), NOT_PROMPTS, ids=[repr(p)[:30] for p, _ in NOT_PROMPTS]
)
def test_what_is_not_a_prompt_is_refused_naming_it(tok_llm: LLM, prompt, pattern: str) -> None:  # fmt: skip
    with pytest.raises(InvalidRequestError, match=pattern):
        tok_llm.generate(prompt, GREEDY, use_tqdm=False)
    assert tok_llm.engine.is_idle()


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (dict(stop=5), r"stop must be a string or a list of strings, got int 5"),
        (dict(stop=b"ab"), r"stop must be a string or a list of strings, got bytes"),
        (dict(stop={"a"}), r"stop must be"),
        (dict(stop_token_ids=5), r"stop_token_ids must be a list of ids, got int"),
    ],
)
def test_sampling_params_of_the_wrong_type_are_refused_at_construction(
    fields: dict, pattern: str
) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        SamplingParams(**fields)


INT32 = 2**31
BAD_PARAMS = [
    (dict(top_k=INT32), r"top_k must be in \[-2147483648, 2147483647\], got 2147483648"),
    (dict(top_k=2**63), r"top_k"),
    (dict(n=INT32), r"\bn must be in"),
    (dict(max_tokens=INT32), r"max_tokens must be in"),
    (dict(min_tokens=INT32, max_tokens=None), r"min_tokens must be in"),
    (dict(logprobs=INT32), r"logprobs must be in \[0, 20\]"),
    (dict(stop_token_ids=[INT32]), r"stop_token_ids must be non-negative integers"),
    (dict(seed=2**64), r"seed must fit in 64 bits"),
    (dict(seed=-(2**63) - 1), r"seed must be in"),
    (dict(temperature=1e39), r"temperature must be finite in float32"),
    (dict(temperature=-1e-9), r"temperature must be 0 \(greedy\) or at least"),
    (dict(temperature="0.5"), r"temperature must be a number, got '0\.5'"),
    (dict(top_p=1e-50), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=1e-50), r"repetition_penalty must be in"),
    (dict(presence_penalty=float("nan")), r"presence_penalty must be finite"),
    (dict(ignore_eos="yes"), r"ignore_eos must be true or false"),
    (dict(skip_special_tokens=None), r"skip_special_tokens must be true or false"),
    (dict(include_stop_str_in_output=1), r"include_stop_str_in_output must be true or false"),
    (dict(stop=["\ud800"]), r"stop string .* is not valid Unicode"),
    (dict(stop=[5]), r"stop strings must be non-empty strings, got 5"),
    (dict(max_tokens=4.0), r"max_tokens must be an integer, got 4\.0"),
]


@pytest.mark.parametrize(("fields", "pattern"), BAD_PARAMS)
def test_sampling_values_past_the_device_ranges_are_refused(
    tok_llm: LLM, fields: dict, pattern: str
) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        tok_llm.generate([1, 2, 3], SamplingParams(**{"max_tokens": 4, **fields}), use_tqdm=False)
    assert tok_llm.engine.is_idle()


def test_fields_changed_after_construction_are_checked_too(tok_llm: LLM) -> None:
    sp = SamplingParams(max_tokens=4)
    sp.stop = 5
    with pytest.raises(InvalidRequestError, match=r"stop must be a string or a list"):
        tok_llm.generate([1, 2, 3], sp, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"sampling_params must be a SamplingParams"):
        tok_llm.generate([1, 2, 3], {"max_tokens": 4}, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"sampling params must be a SamplingParams"):
        tok_llm.generate([[1, 2, 3]], [None], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"priority must be a list"):
        tok_llm.generate([1, 2, 3], GREEDY, priority=5, use_tqdm=False)


def test_the_largest_values_the_device_holds_still_work(tok_llm: LLM) -> None:
    greedy = tok_llm.generate([1, 2, 3], GREEDY, use_tqdm=False)[0]
    sp = SamplingParams(
        max_tokens=4, temperature=1e-5, top_k=INT32 - 1, seed=2**64 - 1, ignore_eos=True
    )
    (out,) = tok_llm.generate([1, 2, 3], sp, use_tqdm=False)
    assert len(_tokens(out)) == 4
    # Below vLLM's 1e-5 a temperature is greedy, rather than overflowing float32.
    tiny = SamplingParams(max_tokens=4, temperature=1e-40, ignore_eos=True)
    assert tiny.temperature == 0.0
    assert _tokens(tok_llm.generate([1, 2, 3], tiny, use_tqdm=False)[0]) == _tokens(greedy)


def test_async_engine_takes_dict_prompts_and_refuses_non_prompts(tok_llm: LLM) -> None:
    offline = tok_llm.generate(TEXT, GREEDY, use_tqdm=False)[0]
    aengine = AsyncLLMEngine(tok_llm.engine)

    async def collect(prompt) -> list[int]:
        ids: list[int] = []
        async for out in aengine.generate(prompt, GREEDY):
            ids += out.outputs[0].token_ids
        return ids

    async def main() -> None:
        assert await collect({"prompt": TEXT}) == _tokens(offline)
        assert await collect({"prompt_token_ids": offline.prompt_token_ids}) == _tokens(offline)
        for bad, pattern in [
            ("\ud800", r"lone surrogate"),
            (b"abc", r"got bytes"),
            (None, r"got None"),
            ({"prompt": None}, r"must be a string"),
        ]:
            with pytest.raises(InvalidRequestError, match=pattern):
                await collect(bad)
        assert await collect(TEXT) == _tokens(offline)

    try:
        asyncio.run(main())
        assert aengine.wait_idle()
    finally:
        aengine.shutdown()
