"""The engine gives the same tokens through the interpret-mode Pallas kernels as through XLA."""

from __future__ import annotations

import pytest

from tests.engine.helpers import greedy, make_engine, run

pytestmark = pytest.mark.timeout(900)

PROMPTS = [[5, 17, 200, 3, 9, 41, 77, 12, 13], [42], [7] * 21]


@pytest.fixture(scope="module")
def xla_tokens(llama_dir: str) -> dict[str, list[int]]:
    engine = make_engine(llama_dir, attention_backend="xla", max_num_batched_tokens=16)
    res = run(engine, [(str(i), p, greedy(6), i) for i, p in enumerate(PROMPTS)])
    return {k: v.outputs[0].token_ids for k, v in res.items()}


@pytest.mark.parametrize("backend", ["pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_interpreted_kernels_match_xla(
    llama_dir: str, xla_tokens: dict[str, list[int]], backend: str
) -> None:
    # Chunked prefill (budget 16) and staggered arrivals: mixed prefill/decode steps.
    engine = make_engine(llama_dir, attention_backend=backend, max_num_batched_tokens=16)
    res = run(engine, [(str(i), p, greedy(6), i) for i, p in enumerate(PROMPTS)])
    assert {k: v.outputs[0].token_ids for k, v in res.items()} == xla_tokens
    assert engine.is_idle()
