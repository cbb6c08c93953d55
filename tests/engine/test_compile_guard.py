"""After warm-up, serving never compiles, and a steady step is one device call."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import jax
import pytest

from jserve.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def no_compiles() -> Iterator[list[str]]:
    """Fails the test if anything compiles inside the block."""
    compiles: list[str] = []

    def listener(event: str, duration: float, **kw: object) -> None:
        if event == COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3 + 1)(2.0)  # the listener sees a compile
        assert len(compiles) == 1
        compiles.clear()
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


@pytest.fixture(scope="module")
def warm_engines(llama_dir: str) -> dict[int, object]:
    # 6 sequences: n=6 makes 5 copy-on-write copies in one step, a batch size that is
    # not a power of two.
    return {
        n: make_engine(llama_dir, warmup=True, max_logprobs=4, max_num_seqs=n, num_pages=96)
        for n in (8, 6)
    }


@pytest.mark.parametrize("max_num_seqs", [8, 6])
def test_no_compilation_for_the_cases_that_used_to_compile(
    warm_engines: dict, max_num_seqs: int
) -> None:
    engine = warm_engines[max_num_seqs]
    reqs = [
        ("a", list(range(1, 70)), SamplingParams(max_tokens=9, temperature=0), 0),
        ("b", [5, 6], SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9), 1),
        ("c", [7] * 33, SamplingParams(max_tokens=5, n=3, temperature=1.0), 2),
        ("d", [8] * 12, SamplingParams(max_tokens=7, logprobs=4, top_k=5), 4),
        ("e", list(range(3, 40)), SamplingParams(max_tokens=3, min_tokens=2), 6),
        ("f", [9] * 6, SamplingParams(max_tokens=4, n=max_num_seqs, temperature=1.0), 8),
        # Penalties, with histories of very different lengths.
        ("g", [3] * 50, SamplingParams(max_tokens=6, presence_penalty=1.0), 9),
        ("h", [4], SamplingParams(max_tokens=6, frequency_penalty=0.5, repetition_penalty=1.2), 9),
        # More sampled rows than tokens: n = max_num_seqs from a 3-token prompt.
        ("i", [1, 2, 3], SamplingParams(max_tokens=3, n=max_num_seqs, temperature=1.0), 12),
        # Ten stop ids banned while below min_tokens.
        (
            "j",
            [5] * 4,
            SamplingParams(max_tokens=6, min_tokens=4, stop_token_ids=list(range(10))),
            14,
        ),
        # A logit bias, beside rows without one.
        ("k", [6] * 5, SamplingParams(max_tokens=5, logit_bias={3: 5.0, 7: -100.0}), 15),
    ]
    with no_compiles():
        out = run(engine, reqs)
    assert len(out["i"].outputs) == max_num_seqs


def test_random_sampling_parameters_compile_nothing(warm_engines: dict) -> None:
    engine = warm_engines[8]
    rng = random.Random(7)
    reqs = []
    for i in range(200):
        prompt_len = rng.choice([1, 2, 3, 5, 9, 17, 40, 90])
        max_tokens = rng.randint(1, 12)
        sp = SamplingParams(
            n=rng.choice([1, 1, 1, 2, 3, 8]),
            max_tokens=max_tokens,
            min_tokens=min(max_tokens, rng.choice([0, 0, 2])),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_p=rng.choice([1.0, 0.9]),
            top_k=rng.choice([-1, -1, 5]),
            min_p=rng.choice([0.0, 0.0, 0.1]),
            presence_penalty=rng.choice([0.0, 0.0, 1.0]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
            stop_token_ids=rng.sample(range(256), rng.choice([0, 0, 1, 10])),
            logprobs=rng.choice([None, None, 0, 4]),
            seed=rng.choice([None, i]),
            ignore_eos=rng.random() < 0.5,
        )
        prompt = [rng.randrange(1, 256) for _ in range(prompt_len)]
        reqs.append((f"r{i}", prompt, sp, i // 4))
    with no_compiles():
        out = run(engine, reqs)
    assert len(out) == 200
    assert engine.pool.num_used == 0


def test_prompt_logprobs_compile_nothing(warm_engines: dict) -> None:
    # Long prompts scored in row-limited chunks beside sampling rows, forks,
    # max_tokens=0, penalties and cache hits on the same prefix.
    engine = warm_engines[8]
    long = list(range(5, 95))
    reqs = [
        ("a", long, SamplingParams(max_tokens=0, prompt_logprobs=4), 0),
        ("b", long, SamplingParams(max_tokens=4, temperature=0), 0),
        ("c", [3] * 20, SamplingParams(max_tokens=5, n=3, temperature=1.0, prompt_logprobs=1), 1),
        ("d", [9], SamplingParams(max_tokens=0, prompt_logprobs=0), 2),
        (
            "e",
            long[:41],
            SamplingParams(max_tokens=3, presence_penalty=1.0, logprobs=2, prompt_logprobs=2),
            3,
        ),
        ("f", long, SamplingParams(max_tokens=2, prompt_logprobs=3, top_p=0.9), 5),
    ]
    with no_compiles():
        out = run(engine, reqs)
    assert [len(out[r].prompt_logprobs) for r in "acdef"] == [90, 20, 1, 41, 90]
    assert engine.pool.num_used == 0


def test_a_steady_decode_step_is_one_device_call(warm_engines: dict) -> None:
    engine = warm_engines[8]
    sp = SamplingParams(max_tokens=30, temperature=0.7, presence_penalty=0.5, logprobs=2)
    for i in range(4):
        engine.add_request(f"s{i}", [i + 1] * 5, sp)
    for _ in range(4):  # admission, forks and copies settle
        engine.step()
    runner = engine.runner
    before = runner.dispatches
    for _ in range(10):
        engine.step()
    assert runner.dispatches - before == 10
    while engine.has_unfinished_requests():
        engine.step()
