"""Quantized KV cache through the engine: calibrated per-layer scales, a page pool that
holds more pages (in the start-up report), tokens, and typed errors."""

from __future__ import annotations

import re

import pytest

from jserve import LLM, SamplingParams
from jserve.errors import ConfigError
from jserve.model_loader import load_model
from jserve.models.kv_quant import check_kv_cache_dtype

KW = dict(dtype="float32", page_size=4, max_num_seqs=16, max_num_batched_tokens=32)
PROMPTS = [[5, 17, 200, 3, 9, 41, 77, 8, 100, 12, 13], [42, 7]]


def _pages(llm: LLM) -> int:
    return int(re.search(r"KV pool (\d+) pages", llm.engine.describe())[1])


@pytest.fixture(scope="module")
def llms(tok_model_dir: str):
    """One engine per KV dtype over the same model, the pool bounded by a 64 KiB budget."""
    from jserve.engine import llm_engine

    saved = llm_engine.CPU_DEFAULT_KV_BYTES
    llm_engine.CPU_DEFAULT_KV_BYTES = 64 << 10
    try:
        return {
            kv: LLM(model=tok_model_dir, max_model_len=64, warmup=False, kv_cache_dtype=kv, **KW)
            for kv in ("auto", "fp8", "int8")
        }
    finally:
        llm_engine.CPU_DEFAULT_KV_BYTES = saved


def test_pool_holds_more_pages_and_the_report_says_so(llms) -> None:
    auto, fp8, int8 = _pages(llms["auto"]), _pages(llms["fp8"]), _pages(llms["int8"])
    assert fp8 == int8 == 4 * auto  # one byte per value instead of float32's four
    assert "(float32)" in llms["auto"].engine.describe()
    assert "(int8 (per-layer scales))" in llms["int8"].engine.describe()
    assert llms["int8"].engine.runner.kv_pages[0].dtype.name == "int8"
    assert llms["fp8"].engine.runner.kv_pages[0].dtype.name == "float8_e4m3fn"


def test_scales_per_layer(llms) -> None:
    int8 = llms["int8"].cfg.kv_cache
    assert len(int8.scales) == llms["int8"].cfg.num_layers
    assert all(0 < k < 1 and 0 < v < 1 for k, v in int8.scales)  # calibrated amax / 127
    assert llms["fp8"].cfg.kv_cache.scales[0] == (1.0, 1.0)  # the documented default


def test_quantized_kv_scores_like_float(llms) -> None:
    """Prompt logprobs (prefill attends over the pages it has just written) and the first
    decoded token's logprob stay close to the float cache's."""
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def run(llm):
        out = llm.generate(PROMPTS, sp, use_tqdm=False)
        return [
            [e[t].logprob for t, e in zip(p[1:], r.prompt_logprobs[1:], strict=True)]
            + [r.outputs[0].logprobs[0][r.outputs[0].token_ids[0]].logprob]
            for p, r in zip(PROMPTS, out, strict=True)
        ]

    ref = run(llms["auto"])
    for kv, tol in (("fp8", 0.15), ("int8", 0.05)):
        got = run(llms[kv])
        diff = max(abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r))
        assert 0 < diff < tol, (kv, diff)


def test_bad_kv_cache_dtype(tok_model_dir: str, monkeypatch) -> None:
    import jserve.model_loader

    def read(*args: object, **kw: object) -> None:
        pytest.fail("the weights were read before kv_cache_dtype was checked")

    monkeypatch.setattr(jserve.model_loader, "load_params", read)
    with pytest.raises(ConfigError, match="kv_cache_dtype 'fp16'"):
        load_model(tok_model_dir, "float32", kv_cache_dtype="fp16")
    assert check_kv_cache_dtype(None) == "auto"


def test_fp8_kv_needs_an_fp8_gpu(monkeypatch) -> None:
    import types

    import jax

    for cap, ok in (("8.0", False), ("9.0", True)):
        fake = [types.SimpleNamespace(compute_capability=cap)]
        monkeypatch.setattr(jax, "devices", lambda *a, fake=fake: fake)
        if ok:
            assert check_kv_cache_dtype("fp8", backend="gpu") == "fp8"
        else:
            with pytest.raises(ConfigError, match=r"compute capability 8\.9"):
                check_kv_cache_dtype("fp8", backend="gpu")
        assert check_kv_cache_dtype("int8", backend="gpu") == "int8"


def test_fp8_scales_come_from_the_checkpoint_when_it_has_them(llama_dir: str, tmp_path) -> None:
    import os
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = str(tmp_path / "with-scales")
    shutil.copytree(llama_dir, d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    n = sum(1 for k in tensors if k.endswith("self_attn.q_proj.weight"))
    for i in range(n):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = np.array(0.5 + i, np.float32)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = np.array(0.25, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    m = load_model(d, "float32", kv_cache_dtype="fp8")
    assert m.cfg.kv_cache.scales == tuple((0.5 + i, 0.25) for i in range(n))
    # int8 calibrates its own (the checkpoint's scales are for fp8).
    assert load_model(d, "float32", kv_cache_dtype="int8").cfg.kv_cache.scales[0][0] != 0.5
