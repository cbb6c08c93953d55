"""Tensor and pipeline parallelism on virtual CPU devices: same tokens, the expected
collectives, Orbax round trips."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.sharding.probe import run_probe

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

    model_dir = sys.argv[1]
    layouts = [tuple(int(v) for v in x.split("x")) for x in sys.argv[2].split(",")]
    prompts = [[5, 17, 200, 3, 9, 41, 77], [42], list(range(1, 40))]
    out = {}
    for tp, pp, mb in layouts:
        llm = LLM(model=model_dir, dtype="float32", page_size=4, max_num_seqs=4,
                  max_num_batched_tokens=32, min_token_bucket=32, tensor_parallel_size=tp,
                  pipeline_parallel_size=pp, num_microbatches=mb, warmup=False)
        res = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        eng = llm.engine
        hlo = ""
        if pp == 1:
            hlo = eng.runner.lower(("step", 16, 4)).compile().as_text()
        out[f"{tp}x{pp}x{mb}"] = {
            "tokens": [r.outputs[0].token_ids for r in res],
            "all_reduce": len(re.findall(r"= [^ ]+ all-reduce(?:-start)?\\(", hlo)),
            "gathered": re.findall(r"= (\\S+) all-gather(?:-start)?\\(", hlo),
            "describe": eng.describe(),
        }
    print("RESULT" + json.dumps(out))
    """
)


def _probe(model_dir: str, layouts: list[str]) -> dict:
    """Runs each "TPxPPxMICROBATCHES" layout in one fresh interpreter."""
    return run_probe(PROBE, model_dir, ",".join(layouts))


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory) -> str:
    from tests.hf_models import make_tiny_hf_model

    # 8 query heads, 4 KV heads, MLP 128, 4 layers: divisible for tp 2 and 4 and pp 2 and 4.
    return make_tiny_hf_model(
        "llama",
        str(tmp_path_factory.mktemp("tp") / "m"),
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=128,
        num_hidden_layers=4,
        tie_word_embeddings=False,
    )


# One interpreter runs every layout (one step program each: a single token bucket): tp 2
# and 4 (KV heads split) and 8 (each KV head on two devices); pp 2 with one micro-batch
# per stage and with 4, pp 2 x tp 2, pp 4.
LAYOUTS = ["1x1x0", "2x1x0", "4x1x0", "8x1x0", "1x2x0", "1x2x4", "2x2x0", "1x4x0"]


@pytest.fixture(scope="module")
def layouts(tp_model_dir: str) -> dict:
    return _probe(tp_model_dir, LAYOUTS)


def _check_tensor_parallel(res: dict, tps: tuple[int, ...]) -> None:
    one = res["1x1x0"]
    for tp in tps:
        r = res[f"{tp}x1x0"]
        assert r["tokens"] == one["tokens"], tp
        # One all-reduce after attention and one after the MLP per layer (4 layers),
        # plus one for the vocabulary-split embedding lookup; weights are never gathered,
        # only the 4 sampled rows' logits (vocab 256).
        assert r["all_reduce"] == 2 * 4 + 1, r
        assert [g.split("{")[0] for g in r["gathered"]] == ["f32[4,256]"], r
        assert f"model={tp}" in r["describe"]
    assert one["all_reduce"] == 0


def test_tensor_parallel_matches_one_device(layouts: dict) -> None:
    _check_tensor_parallel(layouts, (2, 4, 8))


def test_pipeline_parallel_matches_one_device(layouts: dict) -> None:
    for layout in ("1x2x0", "1x2x4", "2x2x0", "1x4x0"):
        assert layouts[layout]["tokens"] == layouts["1x1x0"]["tokens"], layout
    assert "stage=2, model=2" in layouts["2x2x0"]["describe"]


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
                  max_num_batched_tokens=32, min_token_bucket=32, tensor_parallel_size=tp, warmup=False)
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
