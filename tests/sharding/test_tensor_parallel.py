"""Tensor parallelism on virtual CPU devices: same tokens, the expected collectives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

# Each case runs in a fresh interpreter: the virtual device count is fixed
# when JAX starts.
PROBE = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from jserve import LLM, SamplingParams
    from jserve.engine.inputs import empty_inputs
    from jserve.engine.runner import _forward_jit
    from jserve.models.attention import AttentionMetadata

    model_dir, tps = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    prompts = [[5, 17, 200, 3, 9, 41, 77], [42], list(range(1, 40))]
    out = {}
    for tp in tps:
        llm = LLM(model=model_dir, dtype="float32", page_size=4, max_num_seqs=4,
                  max_num_batched_tokens=32, tensor_parallel_size=tp, warmup=False)
        res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        eng = llm.engine
        inp = empty_inputs(16, 4, eng.runner.pages_per_seq)
        md = AttentionMetadata(inp.positions, inp.slot_mapping, inp.kv_lens,
                               inp.page_indices, inp.cu_q_lens, inp.num_seqs)
        hlo = _forward_jit.lower(eng.runner.params, eng.runner.kv_pages,
                                 eng.runner._prev_tokens, inp.ids, inp.src_rows, md,
                                 inp.logits_indices, cfg=eng.cfg).compile().as_text()
        out[tp] = {
            "tokens": [r.outputs[0].token_ids for r in res],
            "all_reduce": len(re.findall(r"= [^ ]+ all-reduce(?:-start)?\\(", hlo)),
            "all_gather": len(re.findall(r"all-gather", hlo)),
            "describe": eng.describe(),
        }
    print("RESULT" + json.dumps(out))
    """
)


def _probe(model_dir: str, tps: list[int]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, model_dir, ",".join(map(str, tps))],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    import json

    return {int(k): v for k, v in json.loads(line[len("RESULT") :]).items()}


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory) -> str:
    from tests.hf_models import make_tiny_hf_model

    # 8 query heads, 4 KV heads, MLP 128: divisible for tp 2 and 4; tp 8 replicates KV heads.
    return make_tiny_hf_model(
        "llama",
        str(tmp_path_factory.mktemp("tp") / "m"),
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=128,
        tie_word_embeddings=False,
    )


def test_tensor_parallel_matches_one_device(tp_model_dir: str) -> None:
    res = _probe(tp_model_dir, [1, 2, 4])
    for tp in (2, 4):
        assert res[tp]["tokens"] == res[1]["tokens"], tp
        # One all-reduce after attention and one after the MLP per layer (2 layers),
        # plus one for the vocabulary-split embedding lookup; weights are never gathered.
        assert res[tp]["all_reduce"] == 2 * 2 + 1, res[tp]
        assert res[tp]["all_gather"] == 0, res[tp]
        assert f"model={tp}" in res[tp]["describe"]
    assert res[1]["all_reduce"] == 0


ORBAX_PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve import LLM, SamplingParams
    from jserve.errors import ConfigError

    path, tp = sys.argv[1], int(sys.argv[2])
    try:
        llm = LLM(model=path, dtype="float32", page_size=4, max_num_seqs=4,
                  max_num_batched_tokens=32, tensor_parallel_size=tp, warmup=False)
    except ConfigError as e:
        print("ERROR" + str(e))
        sys.exit(0)
    res = llm.generate([[5, 17, 200, 3], [42, 43]], SamplingParams(max_tokens=10,
                       temperature=0, ignore_eos=True), use_tqdm=False)
    print("RESULT" + json.dumps([r.outputs[0].token_ids for r in res]))
    """
)


def _orbax_probe(path: str, tp: int) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", ORBAX_PROBE, path, str(tp)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(x for x in proc.stdout.splitlines() if x.startswith(("RESULT", "ERROR")))


def test_orbax_round_trip_under_another_mesh(tp_model_dir: str, tmp_path) -> None:
    from jserve.cli.main import main

    out = str(tmp_path / "orbax")
    assert main(["convert", tp_model_dir, out, "--dtype", "float32"]) == 0
    hf_tokens = _orbax_probe(tp_model_dir, 1)
    assert hf_tokens.startswith("RESULT")
    assert _orbax_probe(out, 1) == hf_tokens
    assert _orbax_probe(out, 4) == hf_tokens


def test_restore_under_an_indivisible_mesh_is_a_clear_error(tmp_path) -> None:
    from jserve.cli.main import main
    from tests.hf_models import make_tiny_hf_model

    # 6 query heads cannot be split over 4 devices.
    src = make_tiny_hf_model(
        "llama", str(tmp_path / "m"), num_attention_heads=6, num_key_value_heads=2, hidden_size=96
    )
    out = str(tmp_path / "orbax")
    assert main(["convert", src, out, "--dtype", "float32"]) == 0
    err = _orbax_probe(out, 4)
    assert err.startswith("ERROR") and "not divisible by tensor_parallel_size 4" in err
