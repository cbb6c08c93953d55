"""Every backend against JAX's reference on CPU (Pallas kernels in interpret mode).

The matrix is spread over a few small batches rather than crossed in full:
each batch exercises several features at once (GQA ratio, head_dim, dtype,
window, soft cap, split-KV), and each runs on every CPU-runnable backend.
Block sizes are passed explicitly and kept small so interpreted grids stay
short and still cover many blocks per sequence.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
    ref_ragged_paged_attention as jax_reference,
)

import pallas_kernels
from tests.pallas_kernels.batches import Batch, make_batch

CPU_BACKENDS = ("xla", "pallas_gpu_interpret", "pallas_tpu_interpret")


class Case(NamedTuple):
    seqs: list[tuple[int, int]]  # (q_len, kv_len)
    heads: tuple[int, int]  # (num_q_heads, num_kv_heads)
    head_dim: int
    dtype: Any
    page_size: int = 16
    sliding_window: int | None = None
    soft_cap: float | None = None
    block_q: int = 8
    block_kv: int = 32
    # pallas_gpu split-KV: target_items 0 never splits; small targets split a lot.
    target_items: int = 4
    min_chunk: int = 32


CASES = {
    # 16 decode sequences of very different lengths, GQA 4, f32.
    "decode_gqa4_d64": Case(
        [(1, k) for k in (1, 5, 16, 17, 33, 64, 100, 130, 7, 250, 31, 48, 300, 2, 90, 64)],
        (8, 2),
        64,
        jnp.float32,
        block_q=2,
        target_items=16,
    ),
    # Prefill only (q_len == kv_len), MHA, head_dim 128, bf16, no split-KV.
    "prefill_mha_d128_bf16": Case(
        [(37, 37), (64, 64), (5, 5)], (4, 4), 128, jnp.bfloat16, target_items=0
    ),
    # Mixed prefill chunks and decodes, GQA 8, sliding window.
    "mixed_gqa8_window": Case(
        [(1, 90), (40, 40), (7, 100), (1, 1), (25, 60), (3, 3)],
        (16, 2),
        64,
        jnp.float32,
        page_size=8,
        sliding_window=24,
        block_q=2,
        target_items=64,
        min_chunk=16,
    ),
    # MQA, head_dim 128, soft cap, page size 4.
    "mixed_mqa_softcap": Case(
        [(12, 50), (1, 33), (20, 20)],
        (4, 1),
        128,
        jnp.float32,
        page_size=4,
        soft_cap=5.0,
        block_q=4,
        block_kv=16,
    ),
    # GQA 2 in bf16 with window and soft cap together.
    "mixed_gqa2_bf16_window_softcap": Case(
        [(9, 80), (1, 70), (30, 45)],
        (4, 2),
        64,
        jnp.bfloat16,
        sliding_window=16,
        soft_cap=10.0,
    ),
    # Group 3 and head_dim 48: the GPU kernel pads both to powers of two.
    "mixed_group3_d48": Case(
        [(6, 40), (1, 29)], (6, 2), 48, jnp.float32, page_size=8, block_q=4, block_kv=16
    ),
}

# The one large case: a long prefill chunk over ~1300 keys next to decodes.
LARGE = Case(
    [(260, 1300), (1, 1250), (1, 700)],
    (8, 2),
    64,
    jnp.float32,
    block_q=32,
    block_kv=128,
    target_items=32,
    min_chunk=256,
)

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _batch(case: Case) -> Batch:
    return make_batch(
        case.seqs,
        num_q_heads=case.heads[0],
        num_kv_heads=case.heads[1],
        head_dim=case.head_dim,
        page_size=case.page_size,
        dtype=case.dtype,
    )


def _reference_of(fn, b: Batch, **kwargs) -> np.ndarray:
    """Runs a reference (JAX's or ours) on a batch; returns [real tokens, Hq, D].

    Both loop in Python over concrete metadata. Closing over the metadata as
    NumPy arrays lets jit trace that loop once, instead of compiling every
    eager op for every sequence length.
    """
    meta = [np.asarray(a) for a in (b.kv_lens, b.page_indices, b.cu_q_lens, b.num_seqs)]
    run = jax.jit(lambda q, kv_pages: fn(q, kv_pages, *meta, **kwargs))
    return np.asarray(run(b.q, b.kv_pages), np.float32)[: b.num_real_tokens]


@functools.cache
def _reference(name: str) -> np.ndarray:
    case = LARGE if name == "large" else CASES[name]
    return _reference_of(
        jax_reference,
        _batch(case),
        sm_scale=case.head_dim**-0.5,
        sliding_window=case.sliding_window,
        soft_cap=case.soft_cap,
    )


def _run(case: Case, backend: str, b: Batch) -> jax.Array:
    tuning = {}
    if backend.startswith("pallas_gpu"):
        tuning = {"target_items": case.target_items, "min_chunk": case.min_chunk}
    return pallas_kernels.ragged_paged_attention(
        *b.args(),
        sm_scale=case.head_dim**-0.5,
        sliding_window=case.sliding_window,
        soft_cap=case.soft_cap,
        backend=backend,
        block_q=case.block_q,
        block_kv=case.block_kv,
        tuning=tuning,
    )


def _check(out: jax.Array, b: Batch, expected: np.ndarray, dtype: Any) -> None:
    out = np.asarray(out, np.float32)
    n = b.num_real_tokens
    assert out.shape == b.q.shape
    assert not np.isnan(out).any(), "NaN leaked into the output"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out[:n], expected, atol=tol, rtol=tol)
    assert np.all(out[n:] == 0), "padding rows must be exactly zero"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_jax_reference(name: str, backend: str) -> None:
    case = CASES[name]
    b = _batch(case)
    _check(_run(case, backend, b), b, _reference(name), case.dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_case(backend: str) -> None:
    b = _batch(LARGE)
    _check(_run(LARGE, backend, b), b, _reference("large"), LARGE.dtype)


def test_own_reference_agrees_with_jax() -> None:
    """Our reference (reference.py) is the same function as JAX's."""
    for name in ("mixed_gqa8_window", "mixed_mqa_softcap"):
        case = CASES[name]
        b = _batch(case)
        ours = _reference_of(
            pallas_kernels.ref_ragged_paged_attention,
            b,
            sm_scale=case.head_dim**-0.5,
            sliding_window=case.sliding_window,
            soft_cap=case.soft_cap,
        )
        tol = TOLERANCE[case.dtype]
        np.testing.assert_allclose(ours, _reference(name), atol=tol, rtol=tol)


def test_under_jit_with_traced_metadata() -> None:
    """The model calls the kernel inside jit: metadata is traced, values unchecked."""
    case = CASES["decode_gqa4_d64"]
    b = _batch(case)

    @jax.jit
    def step(*args):
        return pallas_kernels.ragged_paged_attention(
            *args,
            sm_scale=case.head_dim**-0.5,
            backend="pallas_gpu_interpret",
            block_q=case.block_q,
            block_kv=case.block_kv,
            tuning={"target_items": case.target_items, "min_chunk": case.min_chunk},
        )

    _check(step(*b.args()), b, _reference("decode_gqa4_d64"), case.dtype)


def test_gpu_kernel_split_and_unsplit_agree() -> None:
    """Forcing many splits (merge kernel) and none gives the same rows."""
    case = CASES["mixed_gqa8_window"]._replace(sliding_window=None)
    b = _batch(case)
    outs = [
        np.asarray(_run(case._replace(target_items=t, min_chunk=16), "pallas_gpu_interpret", b))
        for t in (0, 64)
    ]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_scales_and_empty_batch() -> None:
    """k_scale / v_scale fold into the kernel; num_seqs 0 gives all zeros."""
    case = CASES["mixed_mqa_softcap"]._replace(soft_cap=None)
    b = _batch(case)
    kw = dict(sm_scale=0.2, k_scale=0.5, v_scale=2.0)
    expected = _reference_of(jax_reference, b, **kw)
    for backend in ("xla", "pallas_gpu_interpret"):
        out = pallas_kernels.ragged_paged_attention(
            *b.args(), backend=backend, block_q=4, block_kv=16, **kw
        )
        _check(out, b, expected, jnp.float32)
    empty = b._replace(num_seqs=jnp.zeros((1,), jnp.int32))
    out = pallas_kernels.ragged_paged_attention(
        *empty.args(), backend="pallas_gpu_interpret", block_q=4, block_kv=16
    )
    assert np.all(np.asarray(out) == 0)


def test_xla_ignores_an_infinite_mask_value_with_a_sliding_window() -> None:
    """A block of keys wholly outside the window must not turn rows to NaN or zero."""
    b = make_batch([(4, 200), (1, 90)], num_q_heads=4, num_kv_heads=2, head_dim=64, seed=7)
    kw = dict(sm_scale=0.125, sliding_window=32)
    want = jax_reference(*b.args(), **kw)
    got = pallas_kernels.ragged_paged_attention(
        *b.args(), backend="xla", mask_value=-float("inf"), **kw
    )
    n = b.num_real_tokens
    np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("table_in_smem", [True, False])
def test_tpu_page_table_in_smem_or_hbm(table_in_smem: bool) -> None:
    """A page table past SMEM's budget stays in HBM and is read through a
    128-entry window: rows of 151 pages start off the window's tiles and span
    two windows each; both placements give the reference's output."""
    from pallas_kernels.tpu_attention import tpu_ragged_paged_attention

    b = make_batch(
        [(1, 300), (20, 280), (1, 5), (3, 290)],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=32,
        page_size=2,
    )
    assert b.page_indices.shape[1] > 128
    out = tpu_ragged_paged_attention(
        *b.args(),
        sm_scale=32**-0.5,
        block_q=8,
        pages_per_block=8,
        table_in_smem=table_in_smem,
        interpret=True,
    )
    expected = _reference_of(jax_reference, b, sm_scale=32**-0.5)
    _check(out, b, expected, jnp.float32)
