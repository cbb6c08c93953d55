"""Property-based fuzz of SamplingParams and prompt forms through LLM.generate.

Every input either generates (valid token ids, within max_tokens) or raises
InvalidRequestError, leaving nothing behind; afterwards the engine gives a
known-good request the same tokens as before. Bounded for the default suite:
one shared engine with a short max_model_len, a fixed number of examples, and
derandomized, so a run is repeatable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jserve import LLM, InvalidRequestError, SamplingParams

VOCAB = 320  # tok_model_dir's embedding rows
KNOWN_GOOD = ([5, 17, 200, 3, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


# Values of every kind a caller might pass, mostly hostile.
huge_ints = st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**63, 2**64, -(2**64), 10**30])
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(-3, 3), max_size=2),
    st.floats(allow_nan=True, allow_infinity=True),
    huge_ints,
)


# Valid values for every field, so that generation runs...
VALID = {
    "n": st.integers(1, 3),
    "max_tokens": st.one_of(st.none(), st.integers(1, 8)),
    "min_tokens": st.integers(0, 4),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 2)),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.one_of(st.just(-1), st.integers(1, 400)),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0, 3, exclude_min=True),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(max_size=3))),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}
# ...and values of every other kind a caller might pass, mostly hostile.
ANY = {
    **VALID,
    "temperature": st.floats(allow_nan=True, allow_infinity=True),
    "top_k": st.integers(-3, 2**40),
    "stop_token_ids": st.lists(st.one_of(st.integers(-1, VOCAB + 1), huge_ints), max_size=3),
    "logprobs": st.integers(-1, 2**40),
}


@st.composite
def params(draw: st.DrawFn) -> dict[str, Any]:
    """Valid fields, with up to two replaced by junk or out-of-range values."""
    fields = draw(st.fixed_dictionaries({}, optional=VALID))
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        fields[key] = draw(st.one_of(junk, ANY[key]))
    return fields


# Text including lone surrogates and control characters.
any_text = st.text(st.characters(codec=None), max_size=12)
good_text = st.text(min_size=1, max_size=12)
good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
any_ids = st.lists(st.one_of(st.integers(-2, VOCAB + 2), junk), max_size=8)
good_prompt = st.one_of(
    good_text,
    good_ids,
    st.builds(lambda t: {"prompt": t}, good_text),
    st.builds(lambda t: {"prompt_token_ids": t}, good_ids),
    st.builds(np.array, good_ids),
)
bad_prompt = st.one_of(
    any_text,
    any_ids,
    st.builds(lambda t: {"prompt": t}, st.one_of(any_text, junk)),
    st.builds(lambda t: {"prompt_token_ids": t}, st.one_of(any_ids, junk)),
    st.dictionaries(st.text(max_size=16), st.one_of(any_text, any_ids), max_size=2),
    junk,
)
one_prompt = st.one_of(good_prompt, good_prompt, bad_prompt)
prompts = st.one_of(one_prompt, st.lists(one_prompt, max_size=3))


def _check(outs: list, sp: SamplingParams) -> None:
    for out in outs:
        assert out.finished
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length"), c
            assert all(0 <= t < VOCAB for t in c.token_ids), c.token_ids
            if sp.max_tokens is not None:
                assert len(c.token_ids) <= sp.max_tokens


def test_fuzz_sampling_params_and_prompts(tok_llm: LLM) -> None:
    prompt, good = KNOWN_GOOD
    expected = tok_llm.generate(prompt, good, use_tqdm=False)[0].outputs[0].token_ids
    outcomes = {"ran": 0, "refused": 0}

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(prompts, params())
    def one(prompt: Any, fields: dict[str, Any]) -> None:
        try:
            sp = SamplingParams(**fields)
            outs = tok_llm.generate(prompt, sp, use_tqdm=False)
        except InvalidRequestError:
            outcomes["refused"] += 1
        else:
            _check(outs, sp)
            outcomes["ran"] += 1
        assert tok_llm.engine.is_idle()

    one()
    # Both branches were exercised, and the engine serves as before.
    assert outcomes["ran"] >= 5 and outcomes["refused"] >= 5, outcomes
    assert tok_llm.generate(prompt, good, use_tqdm=False)[0].outputs[0].token_ids == expected
