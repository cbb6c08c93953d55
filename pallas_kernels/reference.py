"""Pure-jnp reference of ragged paged attention: one sequence at a time, dense.

Slow and simple on purpose; every backend is tested against it. It needs
concrete metadata (it loops in Python over ``num_seqs``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def ref_ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D], K of head h at 2h, V at 2h+1
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
) -> jax.Array:
    """Returns [T, Hq, D]; rows past ``cu_q_lens[num_seqs]`` are zero."""
    mask_value = DEFAULT_MASK_VALUE if mask_value is None else mask_value
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_pages.shape[2] // 2
    group = num_q_heads // num_kv_heads
    cu = np.asarray(cu_q_lens)
    out = jnp.zeros_like(q)
    for i in range(int(np.asarray(num_seqs)[0])):
        start, end, kv_len = int(cu[i]), int(cu[i + 1]), int(kv_lens[i])
        q_len = end - start
        pages = kv_pages[page_indices[i]]  # [pages_per_seq, S, 2*Hkv, D]
        kv = pages.reshape(-1, 2 * num_kv_heads, head_dim)[:kv_len]
        k = kv[:, 0::2].astype(jnp.float32)  # [L, Hkv, D]
        v = kv[:, 1::2].astype(jnp.float32)
        if k_scale is not None:
            k = k * k_scale
        if v_scale is not None:
            v = v * v_scale
        k = jnp.repeat(k, group, axis=1)  # [L, Hq, D]
        v = jnp.repeat(v, group, axis=1)
        qs = q[start:end].astype(jnp.float32)
        s = jnp.einsum("qhd,khd->hqk", qs, k) * sm_scale  # [Hq, q_len, L]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        q_pos = (kv_len - q_len) + jnp.arange(q_len)[:, None]
        k_pos = jnp.arange(kv_len)[None, :]
        masked = k_pos > q_pos
        if sliding_window is not None:
            masked |= k_pos <= q_pos - sliding_window
        s = jnp.where(masked[None], mask_value, s)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("hqk,khd->qhd", p, v)
        out = out.at[start:end].set(o.astype(q.dtype))
    return out
