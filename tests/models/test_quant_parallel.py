"""Quantized weights under tensor parallelism 2 and 4 on virtual CPU devices: the same
tokens as one device, the scales split with their weights."""

from __future__ import annotations

import textwrap

import pytest

from tests.sharding.probe import run_probe

pytestmark = pytest.mark.timeout(600)

PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve import LLM, SamplingParams

    model_dir = sys.argv[1]
    prompts = [[5, 17, 200, 3, 9, 41, 77], [42], list(range(1, 30))]
    out = {}
    for case in sys.argv[2].split(","):
        quant, tp, kv = (case.split(":") + ["auto"])[:3]
        llm = LLM(model=model_dir, dtype="float32", page_size=4, max_num_seqs=4,
                  max_num_batched_tokens=32, min_token_bucket=32, max_model_len=64,
                  tensor_parallel_size=int(tp),
                  warmup=False, quantization=quant, kv_cache_dtype=kv)
        res = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        down = llm.model.params["layers"][0]["w_down"]
        out[case] = {
            "tokens": [r.outputs[0].token_ids for r in res],
            "describe": llm.engine.describe(),
            "scale_spec": str(getattr(down.scales.sharding, "spec", "")),
            "value_spec": str(getattr(down.values.sharding, "spec", "")),
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory) -> str:
    from tests.hf_models import make_tiny_hf_model

    # 8 query heads, 4 KV heads, hidden 128, MLP 128: int4 groups of 32 split 4 ways.
    return make_tiny_hf_model(
        "llama",
        str(tmp_path_factory.mktemp("qtp") / "m"),
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=128,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    )


def _check(res: dict, quant: str, tps: tuple[int, ...]) -> None:
    one = res[f"{quant}:1"]["tokens"]
    for tp in tps:
        r = res[f"{quant}:{tp}"]
        assert r["tokens"] == one, (quant, tp)
        assert f"model={tp}" in r["describe"]


def test_quantized_tensor_parallel_matches_one_device(tp_model_dir: str) -> None:
    res = run_probe(PROBE, tp_model_dir, "int8:1,int8:2,int4-g32:1,int4-g32:4")
    _check(res, "int8", (2,))
    _check(res, "int4-g32", (4,))
    # w_down [F, E] splits its inputs F: int4 group scales [F/32, E] split with them,
    # int8 per-channel scales [1, E] are replicated.
    assert res["int4-g32:4"]["value_spec"] == res["int4-g32:4"]["scale_spec"]
    assert "model" in res["int4-g32:4"]["scale_spec"]
    assert "model" not in res["int8:2"]["scale_spec"]


@pytest.mark.slow
def test_quantized_tensor_parallel_other_layouts(tp_model_dir: str) -> None:
    cases = "int8:1,int8:4,fp8:1,fp8:2,int4-g32:1,int4-g32:2,int8:1:int8,int8:4:int8"
    res = run_probe(PROBE, tp_model_dir, cases)
    _check(res, "int8", (4,))
    _check(res, "fp8", (2,))
    _check(res, "int4-g32", (2,))
    # int8 KV pages split by KV head, with the scales calibrated on the sharded model.
    assert res["int8:4:int8"]["tokens"] == res["int8:1:int8"]["tokens"]
    assert "int8 (per-layer scales)" in res["int8:4:int8"]["describe"]
