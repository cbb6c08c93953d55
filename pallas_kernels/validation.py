"""Argument checks shared by every ragged paged attention backend.

Static checks (shapes, dtypes, options) run at trace time. Value checks
(q_len <= kv_len, enough pages) need concrete metadata and run only when the
arguments are not traced, i.e. outside ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def validate_static(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if kv_pages.ndim != 4:
        raise ValueError(
            "kv_pages must be [total_num_pages, page_size, 2*num_kv_heads, head_dim], "
            f"got shape {kv_pages.shape}"
        )
    _, num_q_heads, head_dim = q.shape
    _, _, combined, kv_head_dim = kv_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(
            f"head_dim mismatch: q has {head_dim}, kv_pages has {kv_head_dim}; they must be equal"
        )
    if combined % 2:
        raise ValueError(
            f"kv_pages axis 2 holds K and V interleaved and must be even, got {combined}"
        )
    num_kv_heads = combined // 2
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    for name, arr in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    if kv_lens.ndim != 1:
        raise ValueError(f"kv_lens must be i32[max_num_seqs], got shape {kv_lens.shape}")
    max_num_seqs = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != max_num_seqs:
        raise ValueError(
            f"page_indices must be i32[max_num_seqs={max_num_seqs}, pages_per_seq], "
            f"got shape {page_indices.shape}"
        )
    if cu_q_lens.shape != (max_num_seqs + 1,):
        raise ValueError(
            f"cu_q_lens must be i32[max_num_seqs + 1 = {max_num_seqs + 1}], "
            f"got shape {cu_q_lens.shape}"
        )
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be i32[1], got shape {num_seqs.shape}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if soft_cap is not None and soft_cap == 0.0:
        raise ValueError("soft_cap must be non-zero or None (None disables capping)")


def _is_concrete(*arrays: jax.Array) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def validate_values(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
) -> None:
    """Checks the metadata values; a no-op under tracing."""
    if not _is_concrete(kv_lens, page_indices, cu_q_lens, num_seqs):
        return
    kv_lens_np = np.asarray(kv_lens)
    cu = np.asarray(cu_q_lens)
    pages = np.asarray(page_indices)
    n = int(np.asarray(num_seqs)[0])
    max_num_seqs = kv_lens_np.shape[0]
    page_size = kv_pages.shape[1]
    if not 0 <= n <= max_num_seqs:
        raise ValueError(f"num_seqs ({n}) must be in [0, max_num_seqs={max_num_seqs}]")
    if n and (np.any(np.diff(cu[: n + 1]) < 0) or cu[0] != 0):
        raise ValueError(f"cu_q_lens must start at 0 and be non-decreasing, got {cu[: n + 1]}")
    if n and cu[n] > q.shape[0]:
        raise ValueError(
            f"cu_q_lens[num_seqs] = {cu[n]} exceeds the number of query tokens {q.shape[0]}"
        )
    for i in range(n):
        q_len = int(cu[i + 1] - cu[i])
        kv_len = int(kv_lens_np[i])
        if q_len > kv_len:
            raise ValueError(
                f"sequence {i}: q_len ({q_len}) > kv_len ({kv_len}); the queries are the last "
                "q_len positions of the sequence, so kv_len must include them"
            )
        needed = -(-kv_len // page_size)
        if needed > pages.shape[1]:
            raise ValueError(
                f"sequence {i}: kv_len {kv_len} needs {needed} pages of {page_size} tokens but "
                f"page_indices has only {pages.shape[1]} per sequence"
            )
        used = pages[i, :needed]
        if np.any(used < 0) or np.any(used >= kv_pages.shape[0]):
            raise ValueError(
                f"sequence {i}: page_indices {used.tolist()} point outside the "
                f"{kv_pages.shape[0]} pages of kv_pages"
            )


# Backend-specific knobs accepted through ``tuning``.
_TUNING_KEYS = {
    "xla": frozenset(),
    "pallas_gpu": frozenset({"num_warps", "num_stages", "target_items", "min_chunk"}),
    "pallas_tpu": frozenset({"vmem_limit_bytes"}),
}


def validate_tuning(
    backend: str,
    *,
    block_q: int | None,
    block_kv: int | None,
    tuning: Mapping[str, int] | None,
) -> None:
    """Checks block sizes and backend knobs (``backend`` already resolved)."""
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    allowed = _TUNING_KEYS[backend.removesuffix("_interpret")]
    for key, value in (tuning or {}).items():
        if key not in allowed:
            raise ValueError(
                f"tuning knob {key!r} does not apply to backend {backend!r}; "
                f"it accepts {sorted(allowed)}"
            )
        if not isinstance(value, int) or value < 0 or (value == 0 and key != "target_items"):
            raise ValueError(f"tuning knob {key!r} must be a positive int, got {value!r}")
