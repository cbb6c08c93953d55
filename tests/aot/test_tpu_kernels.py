"""The TPU kernel compiled by the real TPU compiler for v5e, v6e, v5p and v7x.

Ahead of time, with no TPU attached: libtpu compiles for a described slice
(pallas_kernels/targets.py), enforcing each chip's own VMEM and SMEM limits,
which interpret mode and lowering never check. Needs libtpu, so the default
test venv skips this module; ``bin/test-aot`` runs it in a venv with
``.[aot]`` (``.ci/run`` does on every run).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import pytest

pytest.importorskip("libtpu")

from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels.cost import attention_cost
from pallas_kernels.targets import attention_args, tpu_mesh
from pallas_kernels.tpu_attention import tpu_generation, tpu_ragged_paged_attention
from tests.pallas_kernels.test_attention import CASES, LARGE

# One device of each generation.
TARGETS = {"v5e": "v5e-1", "v6e": "v6e-1", "v5p": "v5p-8", "7x": "tpu7x-2"}

# Llama-3-8B attention per chip: 32 q / 8 KV heads on one chip, 4 / 1 at TP 8.
LLAMA3_8B_HEADS = {"tp1": (32, 8), "tp8": (4, 1)}
# 64 sequences; 1024 pages each keeps the page table in SMEM, 8192 (the
# preset's 131072-token context at page 16) puts it in HBM.
PAGES_PER_SEQ = (1024, 8192)
# Token buckets that select the table's decode and mixed entries.
TOKENS = {"decode": 64, "mixed": 512}


def _compile(generation: str, args: tuple, **kwargs: Any):
    fn = jax.jit(functools.partial(tpu_ragged_paged_attention, sm_scale=0.1, **kwargs))
    with jax.set_mesh(tpu_mesh(TARGETS[generation], (1,))):
        assert tpu_generation() == generation
        return fn.lower(*args).compile()


def table_failures(generation: str) -> list[str]:
    """Every table entry of the generation compiled at the 8B shapes: the
    entries that break a limit of the chip, with the compiler's message."""
    failures = []
    for mode, num_tokens in TOKENS.items():
        for tp, heads in LLAMA3_8B_HEADS.items():
            for pages_per_seq in PAGES_PER_SEQ:
                args = attention_args(num_tokens, heads, pages_per_seq=pages_per_seq)
                try:
                    _compile(generation, args)
                except Exception as e:  # the compiler's limit errors have no common type
                    failures.append(f"{mode} {tp} pages_per_seq={pages_per_seq}: {e}")
    return failures


@pytest.mark.parametrize("generation", list(TARGETS))
def test_table_entries_compile(generation: str) -> None:
    assert table_failures(generation) == []


def test_planted_over_large_entry_fails(monkeypatch) -> None:
    """The check above catches an entry past the chip's VMEM: 256-token
    q-blocks over 2048 keys per step fail on every generation."""
    for mode in TOKENS:
        monkeypatch.setitem(tuned._TPU_TABLE, ("v6e", mode), (256, 2048, None))
    failures = table_failures("v6e")
    # Every TP 1 entry (8 KV heads a chip) fails; TP 8 (one head) still fits.
    assert len(failures) == len(TOKENS) * len(PAGES_PER_SEQ)
    assert all(" tp1 " in f for f in failures)
    assert all("vmem" in f.lower() for f in failures), failures[0]


@pytest.mark.parametrize("generation", list(TARGETS))
def test_test_shapes_compile(generation: str) -> None:
    """The interpret-mode test cases (tests/pallas_kernels) compile for real."""
    for name, case in [*CASES.items(), ("large", LARGE)]:
        max_num_seqs = len(case.seqs) + 2
        pages = max(-(-kv // case.page_size) for _, kv in case.seqs) + 1
        num_tokens = -(-sum(q for q, _ in case.seqs) // 8) * 8
        args = attention_args(
            num_tokens,
            case.heads,
            head_dim=case.head_dim,
            dtype=case.dtype,
            page_size=case.page_size,
            max_num_seqs=max_num_seqs,
            pages_per_seq=pages,
        )
        try:
            _compile(
                generation,
                args,
                sliding_window=case.sliding_window,
                soft_cap=case.soft_cap,
                block_q=case.block_q,
                pages_per_block=max(1, case.block_kv // case.page_size),
            )
        except Exception as e:
            raise AssertionError(f"case {name} on {generation}: {e}") from e


def test_cost_estimate_reaches_the_compiler() -> None:
    """XLA's cost analysis counts the kernel's estimated flops and bytes
    (without pl.CostEstimate a Mosaic kernel counts as zero)."""
    args = attention_args(512, (32, 8))
    cost = _compile("v6e", args).cost_analysis()
    if isinstance(cost, list):  # jax < 0.11 returns one dict per program
        cost = cost[0]
    expected = attention_cost(args[0], args[1], args[3])
    assert cost["flops"] >= expected.flops > 0
    assert cost["bytes accessed"] >= expected.bytes_accessed * 0.9
