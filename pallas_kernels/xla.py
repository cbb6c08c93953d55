"""Ragged paged attention in plain XLA (no Pallas): the portable path.

Token-major online softmax: every query token walks the pages of its own
sequence, a block of pages per loop iteration, keeping a running max and sum
(as flash attention does). A decode token reads exactly its sequence's K/V
once; a prefill chunk re-gathers its pages per token, which costs memory
traffic but no extra FLOPs. The loop runs only as far as the longest
sequence needs, so padding page slots are never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import DEFAULT_MASK_VALUE


def token_sequence_ids(
    cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """Sequence index of each flat token, and whether the token is real.

    E.g. cu_q_lens [0, 3, 4, 9, 9] with num_seqs [2] and 6 tokens:
    seq [0, 0, 0, 1, 1, 1] (clamped), valid [T, T, T, T, F, F].
    """
    max_num_seqs = cu_q_lens.shape[0] - 1
    seq_idx = jnp.arange(max_num_seqs, dtype=jnp.int32)
    n = num_seqs[0]
    # Ends past num_seqs may hold anything; push them out of the search.
    ends = jnp.where(seq_idx < n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, tok, side="right").astype(jnp.int32)
    valid = tok < cu_q_lens[n]
    return jnp.minimum(seq, max_num_seqs - 1), valid


def xla_ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D]
    kv_lens: jax.Array,  # i32[max_num_seqs]
    page_indices: jax.Array,  # i32[max_num_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_num_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    if pages_per_block is None:
        pages_per_block = max(1, min(pages_per_seq, 128 // page_size))
    block = pages_per_block * page_size

    seq, valid = token_sequence_ids(cu_q_lens, num_seqs, num_tokens)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    kv_len = jnp.where(valid, kv_lens[seq], 0)  # [T]
    q_pos = kv_len - q_lens[seq] + (jnp.arange(num_tokens) - cu_q_lens[seq])  # [T]
    seq_pages = page_indices[seq]  # [T, pages_per_seq]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)  # [T, K, G, D]
    max_kv = jnp.max(kv_len)
    num_blocks = (max_kv + block - 1) // block

    def body(j, carry):
        m, denom, acc = carry  # [T, K, G], [T, K, G], [T, K, G, D]
        cols = j * pages_per_block + jnp.arange(pages_per_block)
        pages = seq_pages[:, jnp.minimum(cols, pages_per_seq - 1)]  # [T, B]
        kv = kv_pages[pages].reshape(num_tokens, block, combined, head_dim)  # [T, L, 2K, D]
        k = kv[:, :, 0::2]  # [T, L, K, D]
        v = kv[:, :, 1::2]
        k_pos = j * block + jnp.arange(block)  # [L]
        live = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] < kv_len[:, None])  # [T, L]
        if sliding_window is not None:
            live &= k_pos[None] > q_pos[:, None] - sliding_window
        if k_scale is not None:
            k = (k.astype(jnp.float32) * k_scale).astype(q.dtype)
        if v_scale is not None:
            v = (v.astype(jnp.float32) * v_scale).astype(q.dtype)
        # Unused page slots may hold anything, NaN included: zero them.
        v = jnp.where(live[:, :, None, None], v, 0)
        s = jnp.einsum("tkgd,tlkd->tkgl", qg, k, preferred_element_type=jnp.float32)
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        live_b = live[:, None, None, :]
        # Masked keys get exactly zero weight (as in the Pallas kernels): the
        # finite mask value keeps the running max NaN-free even when a whole
        # block is masked.
        s = jnp.where(live_b, s, DEFAULT_MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(live_b, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l_new = alpha * denom + p.sum(axis=-1)
        pv = jnp.einsum("tkgl,tlkd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l_new, alpha[..., None] * acc + pv

    stats = jnp.full((num_tokens, num_kv_heads, group), DEFAULT_MASK_VALUE, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros(qg.shape, jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
