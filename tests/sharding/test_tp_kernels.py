"""Tensor parallelism with the Pallas attention kernels (in their interpreters) on
virtual CPU devices: same greedy tokens as one device, and a compiled step
whose only collectives are the per-layer all-reduces."""

from __future__ import annotations

import textwrap

import pytest

from tests.sharding.probe import run_probe

pytestmark = pytest.mark.timeout(600)

BACKENDS = ("pallas_tpu_interpret", "pallas_gpu_interpret")
NUM_LAYERS = 2

# One fresh interpreter runs every layout (the virtual device count is fixed
# when JAX starts). Each layout is "BACKEND:TP:PP"; "hlo" compiles the step of
# that layout's engine and counts its collectives.
PROBE = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from jserve import LLM, SamplingParams

    def count(op, hlo):
        return len(re.findall(r"= [^ ]+ " + op + r"(?:-start)?\\(", hlo))

    model_dir = sys.argv[1]
    prompts = [[5, 17, 200, 3, 9, 41, 77], [42]]
    out = {}
    for layout in sys.argv[2].split(","):
        backend, tp, pp, *hlo = layout.split(":")
        # One token and one sequence bucket, a small pool: one compile per engine.
        llm = LLM(model=model_dir, dtype="float32", page_size=4, max_num_seqs=2,
                  max_num_batched_tokens=16, min_token_bucket=16, max_model_len=32,
                  tensor_parallel_size=int(tp),
                  pipeline_parallel_size=int(pp), attention_backend=backend, warmup=False)
        res = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        r = {"tokens": [x.outputs[0].token_ids for x in res]}
        if hlo:
            text = llm.engine.runner.lower(("step", 16, 2)).compile().as_text()
            r.update({op: count(op, text) for op in
                      ("all-reduce", "all-to-all", "collective-permute")})
            r["gathered"] = re.findall(r"= (\\S+) all-gather(?:-start)?\\(", text)
        out[layout] = r
    print("RESULT" + json.dumps(out))
    """
)


# The tensor-parallel sizes each backend runs beside one device (and tp 2 compiled for
# its collectives): KV heads split (2, 4) and replicated (8).
TPS = (2, 4, 8)


def _layouts() -> list[str]:
    out = []
    for backend in BACKENDS:
        out += [f"{backend}:1:1"] + [
            f"{backend}:{tp}:1" + (":hlo" if tp == 2 else "") for tp in TPS
        ]
    # The head shard_map nested in the pipeline's (manual over "stage").
    out.append("pallas_gpu_interpret:2:2")
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    from tests.hf_models import make_tiny_hf_model

    # 8 query heads, 4 KV heads: tp 8 holds each KV head on two devices.
    model_dir = make_tiny_hf_model(
        "llama",
        str(tmp_path_factory.mktemp("tpk") / "m"),
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=128,
        num_hidden_layers=NUM_LAYERS,
        tie_word_embeddings=False,
    )
    # The TPU interpreter meets all devices at a barrier inside host callbacks,
    # so the CPU client needs a thread per virtual device (it sizes its pool
    # from the core count otherwise, and 8 devices on 2 cores deadlock).
    return run_probe(PROBE, model_dir, ",".join(_layouts()), env={"PJRT_NPROC": "16"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_backend_under_tensor_parallelism_matches_one_device(
    probe: dict, backend: str
) -> None:
    one = probe[f"{backend}:1:1"]["tokens"]
    for tp in TPS:
        layout = f"{backend}:{tp}:1" + (":hlo" if tp == 2 else "")
        assert probe[layout]["tokens"] == one, layout
    # Both interpreters compute the same attention.
    assert one == probe[f"{BACKENDS[0]}:1:1"]["tokens"]


def test_head_shard_map_composes_with_pipeline_parallelism(probe: dict) -> None:
    want = probe["pallas_gpu_interpret:1:1"]["tokens"]
    assert probe["pallas_gpu_interpret:2:2"]["tokens"] == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_step_gathers_no_pages_or_queries(probe: dict, backend: str) -> None:
    r = probe[f"{backend}:2:1:hlo"]
    # Attention runs on each device's own heads: no pages or queries are gathered
    # or moved. The one gather is of the sampled rows' logits (2 rows, vocab 256).
    assert [g.split("{")[0] for g in r["gathered"]] == ["f32[2,256]"], r
    assert r["all-to-all"] == 0, r
    assert r["collective-permute"] == 0, r
    # One all-reduce after attention and one after the MLP per layer, plus one
    # for the vocabulary-split embedding lookup.
    assert r["all-reduce"] == 2 * NUM_LAYERS + 1, r
