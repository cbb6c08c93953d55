"""After warm-up, serving never compiles."""

from __future__ import annotations

import jax
import pytest

from jserve.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# 6 sequences: n=6 makes 5 copy-on-write copies in one step, a batch size that is
# not a power of two.
@pytest.mark.parametrize("max_num_seqs", [8, 6])
def test_no_compilation_in_steady_state(llama_dir: str, max_num_seqs: int) -> None:
    engine = make_engine(llama_dir, warmup=True, max_logprobs=4, max_num_seqs=max_num_seqs)
    compiles: list[str] = []

    def listener(event: str, duration: float, **kw: object) -> None:
        if event == COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3 + 1)(2.0)  # the listener sees a compile
        assert len(compiles) == 1
        compiles.clear()
        reqs = [
            ("a", list(range(1, 70)), SamplingParams(max_tokens=9, temperature=0), 0),
            ("b", [5, 6], SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9), 1),
            ("c", [7] * 33, SamplingParams(max_tokens=5, n=3, temperature=1.0), 2),
            ("d", [8] * 12, SamplingParams(max_tokens=7, logprobs=4, top_k=5), 4),
            ("e", list(range(3, 40)), SamplingParams(max_tokens=3, min_tokens=2), 6),
            ("f", [9] * 6, SamplingParams(max_tokens=4, n=max_num_seqs, temperature=1.0), 8),
        ]
        run(engine, reqs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
