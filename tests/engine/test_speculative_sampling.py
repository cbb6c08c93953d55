"""Speculative decoding keeps the target's distribution: rejection sampling on the device
against the exact processed distribution, and end to end against sampling without it.

Seeds are fixed, so these are deterministic (chi-square p-values, not flaky)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import stats

from jserve.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run
from tests.engine.test_sampler import LOGITS, _draw
from tests.hf_models import make_tiny_hf_model

N = 20000
NUM_SAMPLES = 2400
P = np.exp(LOGITS.astype(np.float64))
P /= P.sum()


def _processed(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution the sampler draws from (the rows' LOGITS are sorted)."""
    p = P ** (1 / temperature)
    p /= p.sum()
    keep = np.ones(len(p), bool)
    if top_k:
        keep[top_k:] = False
    mass_before = np.cumsum(p) - p
    keep &= mass_before < top_p
    p = np.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize(
    "params",
    [dict(), dict(sort=True, top_p=0.9), dict(sort=True, top_k=3, temperature=0.7)],
    ids=["t1", "top_p", "top_k"],
)
@pytest.mark.parametrize("draft", [0, 2, 5])
def test_rejection_sampling_gives_the_target_distribution(params: dict, draft: int) -> None:
    """Every row verifies proposal ``draft`` (a point mass): the kept-or-resampled tokens
    follow the processed target, including when the proposal is filtered out."""
    want = _processed(
        params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0)
    )
    tokens = _draw(N, draft_ids=draft, **params)
    counts = np.bincount(tokens, minlength=len(P))
    assert counts[want == 0].sum() == 0
    live = want > 0
    expected = want[live] / want[live].sum() * counts.sum()
    chi = stats.chisquare(counts[live], expected)
    assert chi.pvalue > 1e-3, (counts / N, want)


def test_rejection_sampling_against_a_draft_distribution() -> None:
    """Proposals drawn from q, kept with min(1, p/q), else redrawn from max(0, p - q):
    the output follows p."""
    import jax
    import jax.numpy as jnp

    from jserve.engine.sampler import draw
    from jserve.spec import rejection

    q = np.array([0.1, 0.5, 0.05, 0.3, 0.05, 0.0])
    rng = np.random.default_rng(0)
    drafts = rng.choice(len(q), size=N, p=q).astype(np.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(N))
    scaled = jnp.asarray(np.tile(np.log(P), (N, 1)), jnp.float32)
    probs = jnp.asarray(np.tile(q, (N, 1)), jnp.float32)
    tokens = np.asarray(rejection.verify(scaled, probs, jnp.asarray(drafts), keys, draw))
    counts = np.bincount(tokens, minlength=len(P))
    assert stats.chisquare(counts, P / P.sum() * counts.sum()).pvalue > 1e-3, counts / N
    # Accepted exactly when the output is the proposal: at rate sum(min(p, q)).
    assert np.mean(tokens == drafts) == pytest.approx(np.minimum(P, q).sum(), abs=0.015)


def test_greedy_rows_ignore_proposals() -> None:
    assert set(_draw(64, temperature=0.0, draft_ids=3)) == {0}


# -- end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def peaky_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random Llama with 16 tokens and large weights: peaked next-token distributions,
    so proposals are often accepted and often rejected."""
    out = str(tmp_path_factory.mktemp("peaky") / "m")
    return make_tiny_hf_model("llama", out, seed=3, scale=0.5, vocab_size=16)


@pytest.fixture(scope="module")
def peaky_draft(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same weights with one layer fewer: a draft that agrees with the target only
    sometimes."""
    out = str(tmp_path_factory.mktemp("peaky-draft") / "m")
    return make_tiny_hf_model("llama", out, seed=3, scale=0.5, vocab_size=16, num_hidden_layers=1)


@pytest.fixture(scope="module")
def peaky_head(peaky_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random EAGLE head for the peaky model (its proposals are drawn from a flatter
    distribution than the target's, so they are accepted sometimes)."""
    from jserve.config import load_config
    from jserve.spec import eagle

    cfg, hp = eagle.random_head(load_config(peaky_model), seed=4)
    out = str(tmp_path_factory.mktemp("peaky-eagle") / "head")
    eagle.save_head(hp, cfg, out, "float32")
    return out


def _first_tokens(model: str, spec: dict | None, **sp: float) -> list[tuple[int, ...]]:
    engine = make_engine(
        model,
        max_num_seqs=64,
        max_num_batched_tokens=64,
        min_token_bucket=16,  # three step programs
        num_pages=1024,
        max_logprobs=4,  # below the 16-token vocabulary
        speculative_config=spec,
    )
    # The model's own greedy run from [1, 2, 3] (it settles into 6s): the lookup
    # proposes 6s, which the target often keeps and often refuses.
    prompt = [1, 2, 3, 9, 12, 14, 13, 7, 2, 12, 3, 7, 4, 1, 13, 6, 6, 6, 6]
    # A few arrivals a step, so the step's rows have room for proposals (they only use
    # rows no sequence slot needs).
    reqs = [
        (str(i), prompt, SamplingParams(max_tokens=4, seed=i, **sp), i // 8)
        for i in range(NUM_SAMPLES)
    ]
    out = run(engine, reqs)
    if spec is not None:
        s = engine.get_stats()
        # Proposals were made for most sequences, and neither always kept nor always refused.
        assert s.spec_decode_num_drafts > NUM_SAMPLES // 2
        assert 0.1 < s.spec_decode_num_accepted_tokens / s.spec_decode_num_draft_tokens < 0.9
    return [tuple(out[str(i)].outputs[0].token_ids) for i in range(len(reqs))]


def _same_distribution(a: list, b: list) -> float:
    """Chi-square p-value that two samples of outcomes share a distribution (outcomes
    rarer than 10 in both pooled into one bin)."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 20]
    table = [[ca[k] for k in keys], [cb[k] for k in keys]]
    rest = [len(a) - sum(table[0]), len(b) - sum(table[1])]
    if min(rest) > 0:
        table[0].append(rest[0])
        table[1].append(rest[1])
    return stats.chi2_contingency(np.array(table)).pvalue


@pytest.mark.parametrize(
    "method, sp",
    [
        ("ngram", dict(temperature=1.0)),
        ("ngram", dict(temperature=1.0, top_p=0.9)),
        # A draft model and an EAGLE head propose through the same loop on the device and
        # are verified by the same rejection step: one of them runs by default.
        pytest.param("draft_model", dict(temperature=1.0), marks=pytest.mark.slow),
        pytest.param("draft_model", dict(temperature=1.0, top_p=0.9), marks=pytest.mark.slow),
        ("eagle", dict(temperature=1.0)),
    ],
)
def test_first_tokens_match_sampling_without_speculation(
    peaky_model: str, request: pytest.FixtureRequest, sp: dict, method: str
) -> None:
    spec: dict = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        spec["prompt_lookup_min"] = 1
    else:
        fixture = "peaky_draft" if method == "draft_model" else "peaky_head"
        spec["model"] = request.getfixturevalue(fixture)
    base = _first_tokens(peaky_model, None, **sp)
    got = _first_tokens(peaky_model, spec, **sp)
    for pos in range(1, 4):  # the first token is a prefill's: positions 2-4 are verified
        p = _same_distribution([t[pos] for t in base], [t[pos] for t in got])
        assert p > 1e-3, (pos, p)
    assert _same_distribution([t[1:3] for t in base], [t[1:3] for t in got]) > 1e-3
