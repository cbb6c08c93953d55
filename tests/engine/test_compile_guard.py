"""After warm-up, serving never compiles."""

from __future__ import annotations

import jax

from jserve.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_no_compilation_in_steady_state(llama_dir: str) -> None:
    engine = make_engine(llama_dir, warmup=True, max_logprobs=4)
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
        ]
        run(engine, reqs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
