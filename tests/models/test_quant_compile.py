"""A quantized model (int4 weights, int8 KV pages) compiles nothing after warm-up."""

from __future__ import annotations

from jserve.engine.config import EngineConfig
from jserve.engine.llm_engine import LLMEngine
from jserve.model_loader import load_model
from jserve.sampling_params import SamplingParams
from tests.engine.helpers import run
from tests.engine.test_compile_guard import no_compiles


def test_quantized_engine_compiles_nothing_after_warmup(llama_dir: str) -> None:
    model = load_model(llama_dir, "float32", quantization="int4-g32", kv_cache_dtype="int8")
    ecfg = EngineConfig(page_size=4, max_num_seqs=4, max_num_batched_tokens=32, num_pages=64)
    engine = LLMEngine(model, ecfg, warmup=True, progress=False)
    reqs = [
        ("a", list(range(1, 40)), SamplingParams(max_tokens=6, temperature=0), 0),
        ("b", [5, 6], SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9), 1),
        ("c", [7] * 13, SamplingParams(max_tokens=4, n=2, temperature=1.0), 2),
        ("d", [8] * 5, SamplingParams(max_tokens=3, logprobs=2), 3),
    ]
    with no_compiles():
        out = run(engine, reqs)
    assert sorted(out) == ["a", "b", "c", "d"]
    assert engine.runner.kv_pages[0].dtype.name == "int8"
