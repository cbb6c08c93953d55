"""Ragged paged attention in plain XLA (no Pallas): the portable path.

Query-block-major online softmax. The flat token axis is cut into q-blocks of
at most ``block_q`` consecutive tokens of one sequence (work_plan.py's plan,
without split-KV), heaviest first. A *wave* of ``wave`` q-blocks is processed
at a time: for each KV step the wave gathers its blocks' keys and values once
([wave, Hkv, block_kv, D] each) and computes [block_q * group, block_kv]
scores per KV head for all the block's queries, keeping a running max and
sum (as flash attention does). A decode token thus reads its sequence's K/V
once, a prefill chunk once per q-block rather than once per token.

Both loops are data-dependent: the wave loops stop after the last q-block
that has keys to visit (padding tokens form key-less blocks sorted last, so
they cost nothing; the last few blocks run in narrower waves), and each
wave's KV loop covers only the key range its blocks' causal masks (and
sliding window) reach. Rows no block writes, the padding rows, stay zero.
K and V are gathered as two halves straight into [wave, Hkv, block_kv, D],
so no strided de-interleave copy of the gathered pages is made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import work_plan as wp
from pallas_kernels.reference import DEFAULT_MASK_VALUE
from pallas_kernels.tuned_block_sizes import XlaBlockSizes, xla_block_sizes

# In a mixed batch, sequences with at most this many query tokens get the
# decode pass (one-token q-blocks).
SHORT_Q_LEN = 4


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
    block_q: int | None = None,
    wave: int | None = None,
) -> jax.Array:
    """``block_q``, ``wave`` and ``pages_per_block`` override the tuned sizes
    (xla_block_sizes); passing ``block_q`` runs one pass with those sizes.

    In a mixed batch (more than 2 tokens per sequence slot on average) the
    short sequences (q_len <= SHORT_Q_LEN: decodes, short chunks) get a pass
    of their own with the decode sizes, so that a decode token does not fill
    a whole prefill-sized q-block; the other sequences get the mixed sizes.
    Each pass sees the other's sequences as key-less (kv_len 0), which makes
    their q-blocks idle.
    """
    num_tokens = q.shape[0]
    max_num_seqs = page_indices.shape[0]
    page_size = kv_pages.shape[1]
    sizes = xla_block_sizes(num_tokens=num_tokens, max_num_seqs=max_num_seqs, page_size=page_size)
    sizes = sizes._replace(
        block_q=block_q or sizes.block_q,
        wave=wave or sizes.wave,
        pages_per_block=pages_per_block or sizes.pages_per_block,
    )
    kw = dict(
        q=q,
        kv_pages=kv_pages,
        page_indices=page_indices,
        cu_q_lens=cu_q_lens,
        num_seqs=num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    out = jnp.zeros(q.shape, q.dtype)
    if sizes.block_q == 1 or block_q is not None:
        return _attend(out, kv_lens=kv_lens, sizes=sizes, **kw)
    short = cu_q_lens[1:] - cu_q_lens[:-1] <= SHORT_Q_LEN
    decode = xla_block_sizes(num_tokens=1, max_num_seqs=1, page_size=page_size)
    decode = decode._replace(pages_per_block=pages_per_block or decode.pages_per_block)
    out = _attend(out, kv_lens=jnp.where(short, kv_lens, 0), sizes=decode, **kw)
    return _attend(out, kv_lens=jnp.where(short, 0, kv_lens), sizes=sizes, **kw)


def _attend(
    out: jax.Array,  # [T, Hq, D]: rows this pass does not write are kept
    *,
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    k_scale: float | None,
    v_scale: float | None,
    sizes: XlaBlockSizes,
) -> jax.Array:
    """Writes the rows of every q-block with keys to visit."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    block_q = min(sizes.block_q, num_tokens)
    wave = sizes.wave
    pages_per_block = max(1, min(pages_per_seq, sizes.pages_per_block))
    block = pages_per_block * page_size
    rows_per_head = block_q * group  # score rows per KV head in a q-block
    i32 = jnp.int32

    plan = wp.make_work_plan(
        kv_lens,
        cu_q_lens,
        num_seqs,
        num_tokens=num_tokens,
        block_q=block_q,
        block_kv=block,
        sliding_window=sliding_window,
        target_items=0,
        min_chunk=block,
    )
    items = plan.items  # [QB, ITEM_COLS], heaviest q-block first
    has_keys = (items[:, wp.ITEM_VALID] > 0) & (items[:, wp.ITEM_KV_HI] > 0)
    # Blocks with keys come first (they have work, the others none), so the
    # live blocks are items[:num_live].
    num_live = jnp.sum(has_keys.astype(i32))
    items = jnp.where(has_keys[:, None], items, 0)
    items = jnp.pad(items, ((0, wave), (0, 0)))  # slices below never run off the end
    narrow = max(1, wave // 4)  # width of the waves for the last few blocks
    num_wide = num_live // wave
    wide_end = num_wide * wave

    qs = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    r_tok = jnp.arange(rows_per_head, dtype=i32) // group  # token of each score row
    l_idx = jnp.arange(block, dtype=i32)
    k_heads = 2 * jnp.arange(num_kv_heads, dtype=i32)[None, :, None]  # [1, K, 1]

    def run_wave(it, out):
        width = it.shape[0]  # it: [width, ITEM_COLS]
        seq = it[:, wp.ITEM_SEQ]
        row0, rows, pos0 = it[:, wp.ITEM_ROW0], it[:, wp.ITEM_ROWS], it[:, wp.ITEM_POS0]
        kv_lo, kv_hi = it[:, wp.ITEM_KV_LO], it[:, wp.ITEM_KV_HI]
        live_wave = it[:, wp.ITEM_KV_HI] > 0  # idle lanes were zeroed
        kv_hi = jnp.where(live_wave, kv_hi, 0)
        kv_lo = jnp.where(live_wave, kv_lo, jnp.iinfo(i32).max)
        kv_len = jnp.where(live_wave, kv_lens[seq], 0)  # [W]
        tok = row0[:, None] + jnp.arange(block_q, dtype=i32)  # [W, bq]
        tok_ok = jnp.arange(block_q)[None] < rows[:, None]
        # Rows past the block's own may belong to another sequence or be NaN
        # padding; they are computed (rows are independent) but not written.
        qb = qs[jnp.minimum(tok, num_tokens - 1)]  # [W, bq, K, G, D]
        qb = qb.transpose(0, 2, 1, 3, 4).reshape(width, num_kv_heads, rows_per_head, head_dim)
        q_pos = pos0[:, None] + r_tok[None]  # [W, R]
        seq_pages = page_indices[seq]  # [W, pages_per_seq]

        def kv_step(j, carry):
            m, denom, acc = carry  # [W, K, R], [W, K, R], [W, K, R, D]
            cols = jnp.minimum(j * pages_per_block + jnp.arange(pages_per_block), pages_per_seq - 1)
            pages = seq_pages[:, cols][:, None, :]  # [W, 1, B]
            # One gather per half straight into [W, K, B, S, D]: no de-interleave copy.
            k = kv_pages[pages, :, k_heads].reshape(width, num_kv_heads, block, head_dim)
            v = kv_pages[pages, :, k_heads + 1].reshape(width, num_kv_heads, block, head_dim)
            k_pos = j * block + l_idx  # [L]
            key_ok = k_pos[None] < kv_len[:, None]  # [W, L]
            if k_scale is not None:
                k = (k.astype(jnp.float32) * k_scale).astype(q.dtype)
            if v_scale is not None:
                v = (v.astype(jnp.float32) * v_scale).astype(q.dtype)
            # Unused page slots may hold anything, NaN included: zero them.
            v = jnp.where(key_ok[:, None, :, None], v, 0)
            s = jnp.einsum("wkrd,wkld->wkrl", qb, k, preferred_element_type=jnp.float32)
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            live = key_ok[:, None] & (k_pos[None, None] <= q_pos[:, :, None])  # [W, R, L]
            if sliding_window is not None:
                live &= k_pos[None, None] > q_pos[:, :, None] - sliding_window
            live = live[:, None]  # [W, 1, R, L]
            # Masked keys get exactly zero weight (as in the Pallas kernels):
            # the finite mask value keeps the running max NaN-free even when a
            # whole block is masked.
            s = jnp.where(live, s, DEFAULT_MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(live, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l_new = alpha * denom + p.sum(axis=-1)
            pv = jnp.einsum(
                "wkrl,wkld->wkrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32
            )
            return m_new, l_new, alpha[..., None] * acc + pv

        stats = jnp.full((width, num_kv_heads, rows_per_head), DEFAULT_MASK_VALUE, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros(qb.shape, jnp.float32))
        lo = jnp.min(kv_lo) // block
        hi = (jnp.max(kv_hi) + block - 1) // block
        _, denom, acc = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), kv_step, init)
        res = jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)
        res = res.reshape(width, num_kv_heads, block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
        res = res.reshape(width, block_q, num_q_heads, head_dim).astype(q.dtype)
        # Drop the rows outside each block (and whole idle blocks).
        dest = jnp.where(tok_ok & live_wave[:, None], tok, num_tokens)
        return out.at[dest].set(res, mode="drop")

    # Wide waves while enough blocks remain, then narrow ones: a small batch
    # does not pay for a wide wave's idle lanes.
    def wide(i, out):
        return run_wave(jax.lax.dynamic_slice_in_dim(items, i * wave, wave), out)

    def tail(i, out):
        start = wide_end + i * narrow
        return run_wave(jax.lax.dynamic_slice_in_dim(items, start, narrow), out)

    out = jax.lax.fori_loop(0, num_wide, wide, out)
    num_tail = (num_live - wide_end + narrow - 1) // narrow
    return jax.lax.fori_loop(0, num_tail, tail, out)
