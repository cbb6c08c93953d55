"""Device sampling: reproducibility, greedy equivalences and the filters' distributions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine.config import EngineConfig
from jserve.engine.sampler import sample
from jserve.engine.shapes import BAN_WIDTH, BIAS_WIDTH, StepShapes
from jserve.errors import InvalidRequestError
from jserve.sampling_params import SamplingParams
from tests.engine.helpers import greedy, make_engine, run

LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
FLAGS = ("random", "sort", "penalties", "logprobs")


def _draw(
    rows: int,
    sort: bool = False,
    penalties: bool = False,
    history: np.ndarray | None = None,
    bitmask: np.ndarray | None = None,
    **fields: object,
) -> np.ndarray:
    """Draws one token per row of LOGITS; ``history`` [rows, L] is each row's fed
    tokens (``num_prompt`` of them prompt, the rest output)."""
    ecfg = EngineConfig(max_num_seqs=rows, max_num_batched_tokens=rows)
    _, sm = StepShapes(ecfg, 1).layout(rows, rows).new_buffer()
    # The logit bias travels beside the packed buffer (shapes.no_logit_bias).
    sm["bias_ids"] = np.full((rows, BIAS_WIDTH), -1, np.int32)
    sm["bias_values"] = np.zeros((rows, BIAS_WIDTH), np.float32)
    sm["temperature"][:] = 1.0
    sm["seeds"][:] = 1234
    sm["out_position"][:] = np.arange(rows)  # independent draws
    sm["history_rows"][:] = np.arange(rows)
    for k, v in fields.items():
        v = np.asarray(v, sm[k].dtype)
        sm[k][...] = v if v.ndim == 2 else np.broadcast_to(v, sm[k].shape)
    if history is None:
        history = np.full((rows, 1), -1, np.int32)
    sm["history_lens"][:] = history.shape[1]
    biased = bool(np.any(sm["bias_ids"] >= 0))
    masked = bitmask is not None
    sm["flags"][:] = [bool(np.any(sm["temperature"] > 0)), sort, penalties, False, biased, masked]
    logits = jnp.asarray(np.tile(LOGITS, (rows, 1)))
    f = {k: jnp.asarray(v) for k, v in sm.items()}
    out = sample(
        logits,
        f,
        jnp.asarray(history),
        num_out=rows,
        num_logprobs=1,
        bitmask=None if bitmask is None else jnp.asarray(bitmask),
    )
    return np.asarray(out.tokens)


def _freqs(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens, minlength=len(LOGITS)) / len(tokens)


N = 20000
TOL = 4 * np.sqrt(0.25 / N)  # about four standard errors


def test_temperature_one_follows_the_softmax() -> None:
    np.testing.assert_allclose(_freqs(_draw(N)), np.exp(LOGITS), atol=TOL)


def test_temperature_sharpens_and_flattens() -> None:
    for t in (0.5, 2.0):
        want = np.exp(LOGITS / t) / np.exp(LOGITS / t).sum()
        np.testing.assert_allclose(_freqs(_draw(N, temperature=t)), want, atol=TOL)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # 0.4 + 0.25 = 0.65 < 0.7, so the third token (0.15) is kept too.
    got = _freqs(_draw(N, sort=True, top_p=0.7))
    want = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    np.testing.assert_allclose(got, want, atol=TOL)


def test_top_k_and_min_p() -> None:
    got = _freqs(_draw(N, sort=True, top_k=2))
    np.testing.assert_allclose(got, np.array([0.4, 0.25, 0, 0, 0, 0]) / 0.65, atol=TOL)
    # min_p 0.3: keep tokens with p >= 0.3 * 0.4 = 0.12.
    got = _freqs(_draw(N, min_p=0.3))
    np.testing.assert_allclose(got, np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8, atol=TOL)


def test_greedy_and_top_k_one_pick_the_argmax() -> None:
    assert set(_draw(64, temperature=0.0)) == {0}
    assert set(_draw(64, sort=True, top_k=1)) == {0}


def test_penalties_move_probability_away_from_seen_tokens() -> None:
    rows = 4000
    seen = np.full((rows, 1), 0, np.int32)  # token 0 was fed once
    got = _freqs(_draw(rows, penalties=True, history=seen, frequency_penalty=2.0))
    assert got[0] < 0.15  # was 0.4
    # In the prompt only: frequency and presence penalties do not apply ...
    got = _freqs(_draw(rows, penalties=True, history=seen, num_prompt=1, frequency_penalty=2.0))
    np.testing.assert_allclose(got, np.exp(LOGITS), atol=4 * np.sqrt(0.25 / rows))
    # ... but the repetition penalty does.
    got = _freqs(_draw(rows, penalties=True, history=seen, num_prompt=1, repetition_penalty=5.0))
    assert got[0] < 0.4


def test_banned_tokens_are_never_drawn() -> None:
    banned = np.full((N // 4, BAN_WIDTH), -1, np.int32)
    banned[:, :2] = [0, 2]
    got = _freqs(_draw(N // 4, banned=banned))
    assert got[0] == 0 and got[2] == 0


def test_seeded_requests_reproduce_whatever_the_batch(llama_dir: str) -> None:
    engine = make_engine(llama_dir)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
    alone = run(engine, [("a", [3, 4, 5], sp, 0)])["a"].outputs[0].token_ids
    crowd = [(f"x{i}", [i + 1] * (i + 2), SamplingParams(max_tokens=8), 0) for i in range(5)]
    together = run(engine, [*crowd, ("a", [3, 4, 5], sp, 1)])["a"].outputs[0].token_ids
    assert together == alone
    other = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=43, ignore_eos=True)
    assert run(engine, [("b", [3, 4, 5], other, 0)])["b"].outputs[0].token_ids != alone


def test_top_k_one_equals_greedy_in_the_engine(llama_dir: str) -> None:
    engine = make_engine(llama_dir)
    g = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    k1 = SamplingParams(max_tokens=10, temperature=1.3, top_k=1, ignore_eos=True)
    res = run(engine, [("g", [9, 8, 7, 6], g, 0), ("k", [9, 8, 7, 6], k1, 0)])
    assert res["g"].outputs[0].token_ids == res["k"].outputs[0].token_ids


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalties_in_the_engine_reduce_repeats(llama_dir: str, async_scheduling: bool) -> None:
    engine = make_engine(llama_dir, async_scheduling=async_scheduling)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    pen = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=2.0)
    res = run(engine, [("p", [1, 2, 3], plain, 0), ("q", [1, 2, 3], pen, 0)])
    a, b = res["p"].outputs[0].token_ids, res["q"].outputs[0].token_ids
    assert len(set(b)) > len(set(a))


def _bias(rows: int, bias: dict[int, float]) -> dict[str, np.ndarray]:
    ids = np.full((rows, BIAS_WIDTH), -1, np.int32)
    values = np.zeros((rows, BIAS_WIDTH), np.float32)
    ids[:, : len(bias)] = list(bias)
    values[:, : len(bias)] = list(bias.values())
    return dict(bias_ids=ids, bias_values=values)


def test_logit_bias_is_added_before_temperature_and_filters() -> None:
    got = _freqs(_draw(N, **_bias(N, {5: np.log(10.0), 0: -100.0})))
    want = np.exp(LOGITS) * [0, 1, 1, 1, 1, 10]
    np.testing.assert_allclose(got, want / want.sum(), atol=TOL)
    # top_k=1 after the bias keeps the biased token only.
    assert set(_draw(64, sort=True, top_k=1, **_bias(64, {3: 5.0}))) == {3}


def test_rejection_sampling_sees_the_biased_distribution() -> None:
    """A row verifying a proposal keeps or redraws it from the biased distribution."""
    want = np.exp(LOGITS) * [1, 1, 0, 1, 1, 20]
    want /= want.sum()
    for proposal in (2, 5):  # a banned proposal, the favoured one
        got = _freqs(_draw(N, draft_ids=proposal, **_bias(N, {5: np.log(20.0), 2: -100.0})))
        np.testing.assert_allclose(got, want, atol=TOL)


def test_logit_bias_forces_and_bans_greedy_tokens(llama_dir: str) -> None:
    engine = make_engine(llama_dir)
    prompt = [9, 8, 7, 6]
    plain = run(engine, [("p", prompt, greedy(8), 0)])["p"].outputs[0].token_ids
    banned = {t: -100.0 for t in set(plain)}
    res = run(
        engine,
        [
            ("force", prompt, greedy(8, logit_bias={11: 100.0}), 0),
            ("ban", prompt, greedy(8, logit_bias=banned), 0),
            ("plain", prompt, greedy(8), 0),  # beside them, unchanged
        ],
    )
    assert res["force"].outputs[0].token_ids == [11] * 8
    assert not set(res["ban"].outputs[0].token_ids) & set(plain)
    assert res["plain"].outputs[0].token_ids == plain


@pytest.mark.parametrize(
    "bias, match",
    [
        ({1: 100.5}, r"logit_bias of token 1 must be in \[-100, 100\]"),
        ({1: float("nan")}, "logit_bias of token 1 must be a finite number"),
        ({"1": 1.0}, "logit_bias keys must be non-negative token ids"),
        ({-1: 1.0}, "logit_bias keys must be non-negative token ids"),
        ({i: 1.0 for i in range(301)}, "logit_bias has 301 entries; at most 300"),
        ([1, 2], "logit_bias must be a mapping"),
        ({10**6: 1.0}, "logit_bias token id 1000000 is outside the vocabulary"),
    ],
)
def test_bad_logit_bias_is_refused_naming_the_field(
    llama_dir: str, bias: object, match: str
) -> None:
    engine = make_engine(llama_dir)
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("x", [1, 2], SamplingParams(logit_bias=bias))
    assert not engine.requests


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_complete_grammar_ends_the_row_even_below_min_tokens(temperature: float) -> None:
    """Below min_tokens the stop id 4 is banned; where the grammar allows only it (it is
    complete), the row samples it rather than a token the grammar refuses; where the
    grammar allows another token too, the ban holds."""
    rows = 8
    banned = np.full((rows, BAN_WIDTH), -1, np.int32)
    banned[:, 0] = 4
    only_stop = np.full((rows, 1), 1 << 4, np.int32)
    got = _draw(rows, bitmask=only_stop, banned=banned, temperature=temperature)
    assert (got == 4).all(), got
    stop_or_five = np.full((rows, 1), (1 << 4) | (1 << 5), np.int32)
    got = _draw(rows, bitmask=stop_or_five, banned=banned, temperature=temperature)
    assert (got == 5).all(), got
