"""TPU ragged paged attention: a Pallas kernel with the Mosaic TPU lowering.

Grid (num_q_blocks,) over the flat token axis, block_q tokens per step. A TPU
core runs grid steps one after another, so there is nothing to balance; what
matters is keeping the DMA engine busy while the MXU works. Each step:

  * gets its q-block for all heads through the BlockSpec pipeline, in a
    head-major layout [Hkv, G, block_q, D] made by the wrapper, so that one
    KV head's rows are a [G * block_q, D] matrix (collapsing leading dims is
    free in Mosaic; collapsing into the tiled second-minor dim is not);
  * walks the sequences that have tokens in the block (the first one is
    scalar-prefetched, found by the wrapper) and, for each, the KV blocks of
    pages_per_block pages its rows can see; one (sequence, KV block) pair is
    a *step* of a small state machine so the DMA of the next step's pages
    (possibly the next sequence's) starts before the current step computes
    (double buffering in VMEM);
  * for every KV head, masks rows that are not in the current sequence, and
    runs the online softmax in f32 VMEM scratch (m, denom, acc).

Pages are copied whole ([page_size, 2*Hkv, D], one contiguous DMA each) and
K / V of head h are the rows 2h / 2h+1 of the head axis, read with a
sublane-strided load.

Metadata (kv_lens, cu_q_lens, num_seqs, first sequence per block) is
scalar-prefetched into SMEM. The page table is too, flattened to 1D to avoid
SMEM's padding of 2D arrays, while it is small (``SMEM_TABLE_BUDGET_BYTES``);
a larger one (long contexts: 64 sequences x 8192 pages is 2 MiB, past the
1 MiB of SMEM) stays in HBM, and the kernel copies a window of
``TABLE_WINDOW`` entries of one sequence's row into SMEM when a step needs
pages outside the window it holds (one small synchronous DMA per window, so
a long sequence's row is read in a few pieces).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels.cost import attention_cost

# Lanes used to store per-row softmax statistics (one full vreg row).
_LANES = 128

# A page table up to this size is scalar-prefetched into SMEM whole (1 MiB on
# v5e / v6e, shared with the other prefetched metadata); a larger one is read
# from HBM through a window of TABLE_WINDOW entries.
SMEM_TABLE_BUDGET_BYTES = 256 * 1024
TABLE_WINDOW = 256
# A DMA from a 1-D int32 HBM array starts on a multiple of its 128-entry tile.
_TABLE_TILE = 128


def _div(a: jax.Array, b: int) -> jax.Array:
    """Division of non-negative ints. Truncating lax.div: Python's floor ``//``
    lowers through ``sign``, whose Mosaic rule needs to know the TPU model."""
    return lax.div(a, jnp.int32(b))


def _attention_kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # i32[max_num_seqs]
    table_ref,  # i32[max_num_seqs * pages_per_seq] in SMEM, or in HBM (large tables)
    cu_q_lens_ref,  # i32[max_num_seqs + 1]
    num_seqs_ref,  # i32[1]
    first_seq_ref,  # i32[num_q_blocks]: first sequence with a token in the block
    # Inputs.
    q_ref,  # [Hkv, G, BQ, D] (VMEM block)
    kv_hbm_ref,  # [P, page_size, 2*Hkv, D] (HBM)
    # Outputs.
    o_ref,  # [Hkv, G, BQ, D]
    # Scratch.
    kv_buf,  # [2, PPB, page_size, 2*Hkv, D] double buffer
    sems,  # DMA semaphores [2]
    m_ref,  # f32[Hkv, G*BQ, LANES] running max (replicated over lanes)
    l_ref,  # f32[Hkv, G*BQ, LANES] running sum
    acc_ref,  # f32[Hkv, G*BQ, D]
    *window_scratch,  # HBM table only: SMEM i32[W] window, SMEM i32[2] (seq, first), DMA sem
    pages_per_seq: int,
    score_scale: float,
    v_scale: float | None,
    soft_cap: float | None,
    sliding_window: int | None,
):
    j = pl.program_id(0)
    num_kv_heads, group, block_q, head_dim = q_ref.shape
    _, pages_per_block, page_size, _, _ = kv_buf.shape
    block_kv = pages_per_block * page_size
    num_rows = group * block_q
    n = num_seqs_ref[0]
    max_seq = kv_lens_ref.shape[0] - 1
    tok_lo = j * block_q
    tok_hi = tok_lo + block_q

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_range(s):
        """Key blocks [0, nb) of sequence s seen by this q-block, from key kv_lo.

        E.g. block_q 8, tok_lo 8; seq s has tokens [5, 12) and kv_len 20
        (positions 13..19): its rows here are tokens 8..11 at positions
        16..19, so keys [0, 20); with window 4, keys [13, 20) -> kv_lo 13
        rounded down to a block.
        """
        q_start = cu_q_lens_ref[s]
        q_end = cu_q_lens_ref[s + 1]
        kv_len = kv_lens_ref[s]
        first = jnp.maximum(q_start, tok_lo)
        last = jnp.minimum(q_end, tok_hi)  # one past
        delta = kv_len - (q_end - q_start)  # position = token - q_start + delta
        kv_hi = last - q_start + delta
        if sliding_window is None:
            kv_lo = jnp.int32(0)
        else:
            kv_lo = jnp.maximum(first - q_start + delta - sliding_window + 1, 0)
            kv_lo = _div(kv_lo, block_kv) * block_kv
        nb = jnp.where(last > first, _div(kv_hi - kv_lo + block_kv - 1, block_kv), 0)
        return kv_lo, nb

    def seq_live(s):
        return (s < n) & (cu_q_lens_ref[jnp.minimum(s, n)] < tok_hi)

    def next_step(s, b):
        """The (sequence, block) after (s, b), skipping sequences with no blocks."""
        _, nb = seq_range(s)
        s_next = jnp.where(b + 1 < nb, s, s + 1)
        b_next = jnp.where(b + 1 < nb, b + 1, 0)

        def cond(sb):
            s2, _ = sb
            return seq_live(s2) & (seq_range(jnp.clip(s2, 0, max_seq))[1] == 0)

        s_next, b_next = lax.while_loop(cond, lambda sb: (sb[0] + 1, sb[1] * 0), (s_next, b_next))
        return s_next, b_next

    if window_scratch:
        win_ref, win_tag_ref, win_sem = window_scratch
        window = win_ref.shape[0]
        table_size = table_ref.shape[0]
        # Nothing held yet: the window's first flat entry, -1 before the first copy.
        win_tag_ref[0] = jnp.int32(-1)

        def table_row(s, first_page, last_page):
            """Reads entries [first_page, last_page] of row s through the window.

            The window covers flat entries [lo, lo + window) of the table, lo a
            multiple of the 128-entry HBM tile a DMA must start on.
            """
            first = s * pages_per_seq + first_page
            last = s * pages_per_seq + last_page
            lo = win_tag_ref[0]
            held = (lo >= 0) & (first >= lo) & (last < lo + window)

            @pl.when(jnp.logical_not(held))
            def _():
                new_lo = jnp.minimum(_div(first, _TABLE_TILE), (table_size - window) // _TABLE_TILE)
                new_lo = pl.multiple_of(new_lo * _TABLE_TILE, _TABLE_TILE)
                copy = pltpu.make_async_copy(table_ref.at[pl.ds(new_lo, window)], win_ref, win_sem)
                copy.start()
                copy.wait()
                win_tag_ref[0] = new_lo

            lo = win_tag_ref[0]
            return lambda p: win_ref[s * pages_per_seq + p - lo]

    else:

        def table_row(s, first_page, last_page):
            del first_page, last_page
            return lambda p: table_ref[s * pages_per_seq + p]

    def page_span(s, b):
        kv_lo, _ = seq_range(s)
        kv_len = kv_lens_ref[s]
        last_page = jnp.maximum(_div(kv_len + page_size - 1, page_size) - 1, 0)
        first_page = jnp.minimum(_div(kv_lo, page_size) + b * pages_per_block, last_page)
        last_page = jnp.minimum(first_page + pages_per_block - 1, last_page)
        return first_page, last_page

    def start(s, b, slot):
        first_page, last_page = page_span(s, b)
        entry = table_row(s, first_page, last_page)
        for i in range(pages_per_block):
            # Slots past the last page re-read it; their keys are masked.
            page = entry(jnp.minimum(first_page + i, last_page))
            pltpu.make_async_copy(kv_hbm_ref.at[page], kv_buf.at[slot, i], sems.at[slot]).start()

    def wait(slot):
        # A wait counts the bytes of its destination; any source page will do.
        for i in range(pages_per_block):
            pltpu.make_async_copy(kv_hbm_ref.at[0], kv_buf.at[slot, i], sems.at[slot]).wait()

    r = lax.broadcasted_iota(jnp.int32, (num_rows, block_kv), 0)  # [M, BK]
    r_tok = tok_lo + lax.rem(r, jnp.int32(block_q))  # flat token of each row (rows are g-major)
    col = lax.broadcasted_iota(jnp.int32, (num_rows, block_kv), 1)  # [M, BK]

    def compute(s, b, slot):
        kv_lo, _ = seq_range(s)
        q_start = cu_q_lens_ref[s]
        q_end = cu_q_lens_ref[s + 1]
        kv_len = kv_lens_ref[s]
        q_pos = r_tok - q_start + kv_len - (q_end - q_start)  # [M, BK]
        t = kv_lo + b * block_kv + col  # [M, BK] key positions
        live = (r_tok >= q_start) & (r_tok < q_end) & (t <= q_pos) & (t < kv_len)
        if sliding_window is not None:
            live &= t > q_pos - sliding_window
        t_row = kv_lo + b * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)
        for h in range(num_kv_heads):
            q = q_ref[h].reshape(num_rows, head_dim)  # [M, D]
            # [PPB, S, D] -> [BK, D]: merging the page axis into the token axis.
            k = kv_buf[slot, :, :, 2 * h, :].reshape(block_kv, head_dim).astype(q.dtype)
            # Keys past kv_len may be NaN: zero V so 0 * NaN never reaches acc.
            v = kv_buf[slot, :, :, 2 * h + 1, :].reshape(block_kv, head_dim)
            v = jnp.where(t_row < kv_len, v, 0).astype(q.dtype)  # [BK, D]
            sc = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [M, BK]
            sc = sc * score_scale
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            sc = jnp.where(live, sc, -jnp.inf)
            m_prev = jnp.max(m_ref[h], axis=1, keepdims=True)  # [M, 1]
            l_prev = jnp.max(l_ref[h], axis=1, keepdims=True)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no live key yet
            p = jnp.exp(sc - m_safe)  # [M, BK]
            alpha = jnp.exp(m_prev - m_safe)  # [M, 1]
            l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )  # [M, D]
            acc_ref[h] = acc_ref[h] * alpha + pv
            m_ref[h] = jnp.broadcast_to(m_new, (num_rows, _LANES))
            l_ref[h] = jnp.broadcast_to(l_new, (num_rows, _LANES))

    # First step: the first sequence of the block that has keys to visit.
    s0 = first_seq_ref[j]
    s0, b0 = lax.cond(
        seq_live(s0) & (seq_range(jnp.clip(s0, 0, max_seq))[1] == 0),
        lambda: next_step(s0, jnp.int32(-1)),
        lambda: (s0, jnp.int32(0)),
    )

    @pl.when(seq_live(s0))
    def _():
        start(s0, b0, 0)

    def body(state):
        s, b, slot = state
        s_next, b_next = next_step(s, b)

        @pl.when(seq_live(s_next))
        def _():
            start(s_next, b_next, 1 - slot)

        wait(slot)
        compute(s, b, slot)
        return s_next, b_next, 1 - slot

    lax.while_loop(lambda st: seq_live(st[0]), body, (s0, b0, jnp.int32(0)))

    for h in range(num_kv_heads):
        denom = jnp.max(l_ref[h], axis=1, keepdims=True)  # [M, 1]
        out = acc_ref[h] * jnp.where(
            denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0
        )  # [M, D]
        if v_scale is not None:
            out = out * v_scale
        o_ref[h] = out.reshape(group, block_q, head_dim).astype(o_ref.dtype)


def tpu_generation() -> str | None:
    """The chip generation being compiled for ("v5e", "v6e", ...): the context
    mesh's device (ahead-of-time compiles) or the default device; None on a
    machine without a TPU (interpret mode)."""
    try:
        return str(pltpu.get_tpu_info().chip_version)
    except (ValueError, AttributeError, RuntimeError):
        return None


def _hbm_table_kernel(
    kernel,
    kv_lens_ref,
    cu_q_lens_ref,
    num_seqs_ref,
    first_seq_ref,
    q_ref,
    kv_hbm_ref,
    table_ref,
    o_ref,
    *scratch,
):
    """The kernel with the page table as an HBM input instead of a prefetched scalar."""
    kernel(
        kv_lens_ref,
        table_ref,
        cu_q_lens_ref,
        num_seqs_ref,
        first_seq_ref,
        q_ref,
        kv_hbm_ref,
        o_ref,
        *scratch,
    )


def _first_seq_per_block(
    cu_q_lens: jax.Array, num_seqs: jax.Array, num_blocks: int, block_q: int
) -> jax.Array:
    """First sequence with a token at or after each block's start.

    E.g. cu_q_lens [0, 3, 4, 9], num_seqs [3], block_q 4: block starts
    [0, 4, 8] -> [0, 2, 2] (sequence 1 ends at token 4, before block 1).
    """
    max_num_seqs = cu_q_lens.shape[0] - 1
    n = num_seqs[0]
    seq = jnp.arange(max_num_seqs, dtype=jnp.int32)
    ends = jnp.where(seq < n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    return jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)


def tpu_ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [P, page_size, 2*Hkv, D]
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
    block_q: int | None = None,
    pages_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    table_in_smem: bool | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on TPU; returns [T, Hq, D] in q's dtype.

    ``table_in_smem`` forces where the page table lives (None: in SMEM while
    it fits ``SMEM_TABLE_BUDGET_BYTES``, else in HBM read through a window).

    ``interpret=True`` runs the kernel in Pallas's TPU interpreter
    (``pltpu.InterpretParams``), which models SMEM/VMEM, DMAs and semaphores
    on CPU.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    defaults = tuned.tpu_block_sizes(
        num_tokens=num_tokens,
        max_num_seqs=max_num_seqs,
        page_size=page_size,
        generation=tpu_generation(),
    )
    if vmem_limit_bytes is None:
        vmem_limit_bytes = defaults.vmem_limit_bytes
    block_q = defaults.block_q if block_q is None else block_q
    # Rows of a q tile are g-major ([G, block_q] collapsed), which is a free
    # reshape only when block_q fills whole sublane tiles: 8 rows of 32-bit,
    # 16 of 16-bit values.
    sublanes = 8 * max(1, 4 // jnp.dtype(q.dtype).itemsize)
    block_q = -(-block_q // sublanes) * sublanes
    pages_per_block = defaults.pages_per_block if pages_per_block is None else pages_per_block
    pages_per_block = max(1, min(pages_per_block, pages_per_seq))

    num_blocks = -(-num_tokens // block_q)
    padded = num_blocks * block_q
    # Head-major q: [T, Hkv*G, D] -> [Hkv, G, T, D]. E.g. Hq 4, Hkv 2: q head 3
    # is KV head 1, member 1.
    q_t = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    if padded != num_tokens:
        q_t = jnp.pad(q_t, ((0, 0), (0, 0), (0, padded - num_tokens), (0, 0)))
    first_seq = _first_seq_per_block(cu_q_lens, num_seqs, num_blocks, block_q)
    if table_in_smem is None:
        table_in_smem = page_indices.size * 4 <= SMEM_TABLE_BUDGET_BYTES
    table = page_indices.reshape(-1)
    if table_in_smem:
        window_scratch = []
    else:
        # Whole tiles, so every window starts on a tile; the pad is never read
        # for a real page. A window spans any pages_per_block entries of a row.
        table = jnp.pad(table, (0, -table.size % _TABLE_TILE))
        window = -(-max(TABLE_WINDOW, pages_per_block + _TABLE_TILE - 1) // _TABLE_TILE)
        window = min(window * _TABLE_TILE, table.size)
        window_scratch = [
            pltpu.SMEM((window,), jnp.int32),
            pltpu.SMEM((1,), jnp.int32),
            pltpu.SemaphoreType.DMA(()),
        ]

    score_scale = sm_scale * (1.0 if k_scale is None else k_scale)
    kernel = functools.partial(
        _attention_kernel,
        pages_per_seq=pages_per_seq,
        score_scale=score_scale,
        v_scale=v_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    block = pl.BlockSpec((num_kv_heads, group, block_q, head_dim), lambda j, *_: (0, 0, j, 0))
    num_rows = group * block_q
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    if table_in_smem:
        in_specs = [block, any_space]
        operands = (kv_lens, table, cu_q_lens, num_seqs, first_seq, q_t, kv_pages)
    else:
        in_specs = [block, any_space, any_space]
        operands = (kv_lens, cu_q_lens, num_seqs, first_seq, q_t, kv_pages, table)
        kernel = functools.partial(_hbm_table_kernel, kernel)
    out_t = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5 if table_in_smem else 4,
            grid=(num_blocks,),
            in_specs=in_specs,
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_block, page_size, combined, head_dim), kv_pages.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((num_kv_heads, num_rows, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, num_rows, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, num_rows, head_dim), jnp.float32),
                *window_scratch,
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",), vmem_limit_bytes=vmem_limit_bytes
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        cost_estimate=attention_cost(q, kv_pages, page_indices, kv_lens, cu_q_lens, num_seqs),
        name="ragged_paged_attention_tpu",
    )(*operands)
    out = out_t[:, :, :num_tokens].transpose(2, 0, 1, 3)  # [T, Hkv, G, D]
    return out.reshape(num_tokens, num_q_heads, head_dim)
