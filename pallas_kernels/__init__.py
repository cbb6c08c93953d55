"""Ragged paged attention kernels and the KV-cache write.

``ragged_paged_attention`` follows the interface of JAX's TPU kernel
(``jax.experimental.pallas.ops.tpu.ragged_paged_attention``): one flat batch of
query tokens from many sequences, K/V in fixed-size pages of one shared pool.
"""

from __future__ import annotations

import jax

from pallas_kernels.kv_cache import write_kv_pages
from pallas_kernels.reference import DEFAULT_MASK_VALUE, ref_ragged_paged_attention
from pallas_kernels.validation import validate_static, validate_values
from pallas_kernels.xla import xla_ragged_paged_attention

BACKENDS = ("xla",)


def ragged_paged_attention(
    q: jax.Array,  # [max_num_batched_tokens, num_q_heads, head_dim]
    kv_pages: jax.Array,  # [total_num_pages, page_size, 2*num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[max_num_seqs]
    page_indices: jax.Array,  # i32[max_num_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_num_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    mask_value: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Attention of each sequence's last q_len positions over its kv_len keys (causal)."""
    validate_static(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    validate_values(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return xla_ragged_paged_attention(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        mask_value=mask_value,
        k_scale=k_scale,
        v_scale=v_scale,
    )


__all__ = [
    "BACKENDS",
    "DEFAULT_MASK_VALUE",
    "ragged_paged_attention",
    "ref_ragged_paged_attention",
    "write_kv_pages",
]
