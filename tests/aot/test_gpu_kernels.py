"""The GPU kernels compiled by XLA, Triton and ptxas for an H100 (sm_90a).

A deviceless compile: the CUDA plugin and ptxas, no GPU
(pallas_kernels/targets.py). ptxas reports each kernel's registers and
spills (``bin/test-aot`` turns its log on); every tuned table entry must
compile with no spill stores in the attention and merge kernels and leave
room for at least two warp groups (8 warps) per SM. Skipped without the
CUDA plugin; ``bin/test-aot`` installs it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax_cuda12_plugin")

from pallas_kernels import ptxas
from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels.targets import H100_REGISTERS_PER_SM, h100_mesh
from pallas_kernels.triton_attention import triton_ragged_paged_attention

KERNELS = ("ragged_paged_attention_triton", "ragged_paged_attention_merge_triton")
# Token buckets selecting the table's modes at 64 sequences.
TOKENS = {"decode": 64, "mixed": 512}


def _args(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int = 128):
    i32 = jnp.int32
    return (
        jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((4096, 16, 2 * num_kv_heads, head_dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((64,), i32),
        jax.ShapeDtypeStruct((64, 1024), i32),
        jax.ShapeDtypeStruct((65,), i32),
        jax.ShapeDtypeStruct((1,), i32),
    )


@pytest.fixture(scope="module")
def mesh():
    if "subprocess_compilation" not in __import__("os").environ.get("TF_CPP_VMODULE", ""):
        pytest.skip("ptxas' log is off: run through bin/test-aot")
    return h100_mesh()


def _reports(mesh, capfd, args, **kwargs) -> dict[str, ptxas.KernelReport]:
    fn = jax.jit(functools.partial(triton_ragged_paged_attention, sm_scale=0.1, **kwargs))
    capfd.readouterr()
    with jax.set_mesh(mesh):
        fn.lower(*args).compile()
    return ptxas.parse(capfd.readouterr().err)


def _problems(reports: dict[str, ptxas.KernelReport]) -> list[str]:
    out = []
    for name in KERNELS:
        r = reports.get(name)
        if r is None:
            out.append(f"{name}: no ptxas report")
        elif r.spill_stores:
            out.append(f"{name}: {r.spill_stores} bytes of spill stores ({r.registers} registers)")
        elif r.resident_warps(H100_REGISTERS_PER_SM) < 8:
            out.append(f"{name}: {r.registers} registers leave room for under 8 warps per SM")
    return out


@pytest.mark.parametrize("mode", list(TOKENS))
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_table_entry_has_no_spills(mesh, capfd, mode: str, rows: int) -> None:
    """Every GPU table entry at head_dim 128, bf16 (the Llama / Mistral /
    Qwen shapes), with the split-KV merge forced on."""
    num_kv_heads = 8 if rows <= 4 else 4
    args = _args(TOKENS[mode], rows * num_kv_heads, num_kv_heads)
    reports = _reports(mesh, capfd, args, target_items=64, min_chunk=64)
    assert _problems(reports) == []


def test_planted_spilling_entry_is_caught(mesh, capfd) -> None:
    """The check above fails for a tile too large for 4 warps' registers."""
    reports = _reports(
        mesh,
        capfd,
        _args(512, 32, 8),
        block_q=64,
        block_kv=128,
        num_warps=4,
        num_stages=3,
        target_items=64,
        min_chunk=64,
    )
    problems = _problems(reports)
    assert problems and "ragged_paged_attention_triton" in problems[0], reports


def test_gpu_table_is_what_the_checks_cover() -> None:
    keys = {(mode, rows) for mode, rows, _, _ in tuned._GPU_TABLE}
    assert keys == {(m, r) for m in TOKENS for r in (1, 2, 4, 8, 16)}
