"""The attention interface the model calls: write new K/V into pages, then
ragged paged attention over them. The backend is chosen by name."""

from __future__ import annotations

import jax
from flax import struct

import pallas_kernels


@struct.dataclass
class AttentionMetadata:
    """Where each flat token belongs, for one step.

    E.g. two sequences, the first decoding 1 token at position 9 and the
    second prefilling 3 tokens from position 0, page size 4:
      positions    [9, 0, 1, 2]        cu_q_lens [0, 1, 4]     kv_lens [10, 3]
      slot_mapping [p0*4+1, p1*4+0, p1*4+1, p1*4+2]            num_seqs [2]
    Padding tokens have slot -1 and sit past cu_q_lens[num_seqs].
    """

    positions: jax.Array  # i32[T]
    slot_mapping: jax.Array  # i32[T]
    kv_lens: jax.Array  # i32[S]
    page_indices: jax.Array  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array  # i32[S + 1]
    num_seqs: jax.Array  # i32[1]
    # Attention backend name (see pallas_kernels.BACKENDS); static.
    backend: str = struct.field(pytree_node=False, default="xla")


def paged_attention(
    q: jax.Array,  # [T, Hq, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D]
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Stores this step's K/V, then attends; returns ([T, Hq, D], new kv_pages)."""
    kv_pages = pallas_kernels.write_kv_pages(kv_pages, k, v, md.slot_mapping)
    out = pallas_kernels.ragged_paged_attention(
        q,
        kv_pages,
        md.kv_lens,
        md.page_indices,
        md.cu_q_lens,
        md.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        backend=md.backend,
    )
    return out, kv_pages
