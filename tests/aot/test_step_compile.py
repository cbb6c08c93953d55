"""The whole serving step of Llama-3-8B compiled for real targets.

The engine's own fused step (forward, logits, sampling; KV pages donated)
with abstract bf16 weights on the engine's mesh and shardings (jserve.aot),
compiled by libtpu for TPU slices with tensor parallelism and by XLA +
Triton + ptxas for two H100s. Each compile takes tens of seconds on 2 cores,
so one mixed-batch bucket per target. Run by ``bin/test-aot``.
"""

from __future__ import annotations

import importlib.util
import math
import re

import pytest

from jserve.aot import build_runner, compile_step

HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_GPU = importlib.util.find_spec("jax_cuda12_plugin") is not None
MIXED = (512, 64)  # 512 tokens, 64 rows: prefill chunks and decodes together


def _elements(hlo_type: str) -> int:
    dims = re.match(r"\w+\[([\d,]*)\]", hlo_type)[1]
    return math.prod(int(d) for d in dims.split(",") if d)


def _check_tensor_parallel(report, tp: int) -> None:
    # Two all-reduces a layer (attention out, MLP down) and one for the
    # embedding; the only all-gather is of the logits' vocabulary slices.
    assert report.collectives.get("all-reduce") == 2 * 32 + 1, report.collectives
    assert report.collectives.get("all-gather", 0) <= 1, report.collectives
    # The logits, [rows, vocab] in some layout (e.g. f32[8,16032,64] at TP 8).
    assert all(_elements(g) == MIXED[1] * 128256 for g in report.gathered), report.gathered
    assert report.pages_aliased, (report.alias_bytes, report.kv_pool_bytes)
    assert report.pool_copies == 0, "the KV pool was copied to another layout"
    # The pool is split by KV head: each device holds 1/tp of it.
    assert report.kv_pool_bytes * tp == 64 * 128 * 32 * 16 * 2 * 8 * 128 * 2


@pytest.mark.skipif(not HAS_TPU, reason="needs libtpu: run bin/test-aot")
@pytest.mark.parametrize(("target", "tp"), [("v5e-8", 8), ("v6e-4", 4)])
def test_llama3_8b_step_with_tensor_parallelism_on_tpu(target: str, tp: int) -> None:
    report = compile_step("llama3-8b", target, tp=tp, shape=MIXED)
    _check_tensor_parallel(report, tp)
    assert report.flops and report.flops > 0


@pytest.mark.skipif(not HAS_GPU, reason="needs the CUDA plugin: run bin/test-aot")
def test_llama3_8b_step_with_tensor_parallelism_on_two_h100s() -> None:
    report = compile_step("llama3-8b", "h100-2", tp=2, shape=MIXED)
    _check_tensor_parallel(report, 2)


@pytest.mark.skipif(not HAS_TPU, reason="needs libtpu: run bin/test-aot")
def test_full_context_compiles_on_one_chip() -> None:
    """The preset's 131072-token context: 8192 pages a sequence make a 2 MiB
    page table, past SMEM's 1 MiB, so the kernel reads it from HBM."""
    runner = build_runner("llama3-8b", "v6e-1", max_model_len=131072, num_pages=4096)
    assert runner.pages_per_seq == 8192
    report = compile_step("llama3-8b", "v6e-1", shape=(16, 16), runner=runner)
    assert report.pages_aliased


@pytest.mark.skipif(not HAS_TPU, reason="needs libtpu: run bin/test-aot")
def test_bench_estimate_prints_a_row_per_bucket(tmp_path, capsys) -> None:
    from jserve.cli.main import main

    out = tmp_path / "estimate.json"
    rc = main(
        [
            "bench",
            "estimate",
            "--config",
            "qwen3-0.6b",
            "--target",
            "v5e-1",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "16",
            "--max-num-batched-tokens",
            "64",
            "--buckets",
            "16x16",
            "--json",
            str(out),
        ]
    )
    assert rc in (0, None)
    text = capsys.readouterr().out
    assert "compile-time estimates, not measurements" in text
    row = __import__("json").loads(out.read_text())["rows"][0]
    assert row["bucket"] == "16x16" and row["xla_flops"] > 0
    assert row["bound"] == "memory" and row["decode_tokens_per_second_bound"] > 0
