"""Cost estimates the Pallas kernels hand to XLA (``pl.CostEstimate``).

A custom kernel is opaque to XLA's cost model, which counts it as zero flops
and zero bytes unless told. The work of ragged attention depends on the
lengths at run time, which the compiler never sees, so the estimate is that
of a *full* step: the page pool shared evenly among ``max_num_seqs``
sequences (each token attends to its sequence's share of the pool, at most
a whole page-table row) and every page read once.

E.g. T 512 tokens, 32 q heads, head_dim 128, a pool of 4096 pages of 16
shared by 64 sequences: 1024 keys per token, 4 * 512 * 32 * 128 * 1024 =
8.6 GFLOP (QK^T and PV, two flops per multiply-add) and 512 * 32 * 1024
exponentials.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _nbytes(x: jax.Array | jax.ShapeDtypeStruct) -> int:
    return int(x.size) * jnp.dtype(x.dtype).itemsize


def attention_cost(
    q: jax.Array | jax.ShapeDtypeStruct,  # [T, Hq, D]
    kv_pages: jax.Array | jax.ShapeDtypeStruct,  # [P, page_size, 2*Hkv, D]
    page_indices: jax.Array | jax.ShapeDtypeStruct,  # i32[max_num_seqs, pages_per_seq]
    *metadata: jax.Array,
) -> pl.CostEstimate:
    """The estimate of one full ragged attention step (see the module docstring)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size = kv_pages.shape[:2]
    max_num_seqs, pages_per_seq = page_indices.shape
    keys = min(pages_per_seq, max(1, num_pages // max(1, max_num_seqs))) * page_size
    flops = 4 * num_tokens * num_q_heads * head_dim * keys
    transcendentals = num_tokens * num_q_heads * keys
    bytes_accessed = (
        2 * _nbytes(q)  # q in, the output out
        + _nbytes(kv_pages)
        + _nbytes(page_indices)
        + sum(_nbytes(m) for m in metadata)
    )
    return pl.CostEstimate(
        flops=flops, transcendentals=transcendentals, bytes_accessed=bytes_accessed
    )


def merge_cost(*operands: jax.Array, out: jax.Array) -> pl.CostEstimate:
    """The split-KV merge: a few flops per element, every operand read once."""
    return pl.CostEstimate(
        flops=4 * int(out.size),
        transcendentals=int(out.size) // max(1, out.shape[-1]),
        bytes_accessed=sum(_nbytes(x) for x in operands) + _nbytes(out),
    )
