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
import pytest

pytest.importorskip("jax_cuda12_plugin")

from pallas_kernels import ptxas
from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels.targets import H100_REGISTERS_PER_SM, attention_args, h100_mesh
from pallas_kernels.triton_attention import triton_ragged_paged_attention

KERNELS = ("ragged_paged_attention_triton", "ragged_paged_attention_merge_triton")
# Token buckets selecting the table's modes at 64 sequences.
TOKENS = {"decode": 64, "mixed": 512}


@pytest.fixture(scope="module")
def mesh():
    if "subprocess_compilation" not in __import__("os").environ.get("TF_CPP_VMODULE", ""):
        pytest.skip("ptxas' log is off: run through bin/test-aot")
    return h100_mesh()


def _reports(mesh, args, **kwargs) -> dict[str, ptxas.KernelReport]:
    fn = jax.jit(functools.partial(triton_ragged_paged_attention, sm_scale=0.1, **kwargs))
    with jax.set_mesh(mesh):
        return ptxas.compile_reports(fn.lower(*args))


def _problems(reports: dict[str, ptxas.KernelReport]) -> list[str]:
    return ptxas.problems(reports, KERNELS, H100_REGISTERS_PER_SM)


@pytest.mark.parametrize(("mode", "rows"), sorted((m, r) for m, r, _, _ in tuned._GPU_TABLE))
def test_table_entry_has_no_spills(mesh, mode: str, rows: int) -> None:
    """Every GPU table entry (head_dim 128, bf16: the Llama / Mistral / Qwen
    shapes), with the split-KV merge forced on."""
    num_kv_heads = 8 if rows <= 4 else 4
    args = attention_args(TOKENS[mode], (rows * num_kv_heads, num_kv_heads))
    reports = _reports(mesh, args, target_items=64, min_chunk=64)
    assert _problems(reports) == []


def test_planted_spilling_entry_is_caught(mesh) -> None:
    """The check above fails for a tile too large for 4 warps' registers."""
    reports = _reports(
        mesh,
        attention_args(512, (32, 8)),
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
    """The compiles above use head_dim 128 in bf16: every entry must be for that."""
    assert {(d, b) for _, _, d, b in tuned._GPU_TABLE} == {(128, 2)}
    assert {m for m, _, _, _ in tuned._GPU_TABLE} == set(TOKENS)
