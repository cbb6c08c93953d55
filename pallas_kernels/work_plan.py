"""The work plan: which (sequence, q-block, KV split) each kernel program handles.

Built on the device with a few small XLA ops from the metadata, so it works
inside ``jax.jit`` with traced ``kv_lens`` / ``cu_q_lens`` / ``num_seqs`` and
every array has a static length (the grid size of the kernels).

The flat token axis is cut into *segments*: one per sequence, plus one
trailing *padding segment* ``[cu_q_lens[num_seqs], num_tokens)`` whose rows
have no keys and get zeros. Each segment is cut into *q-blocks* of at most
``block_q`` tokens, so a q-block never straddles two sequences. Each q-block
attends to the key range ``[kv_lo, kv_hi)`` that its causal mask (and sliding
window) can reach; a long range is cut into several *splits* of ``chunk`` keys
each (split-KV), each split being one work item, and a merge step combines the
splits of one q-block with their log-sum-exp.

E.g. block_q 4, no window, kv_lens [9, 3], cu_q_lens [0, 1, 4], num_seqs [2],
6 tokens:
  segments    seq 0 rows [0, 1)  seq 1 rows [1, 4)  padding rows [4, 6)
  q-blocks    (seq 0, row 0, 1 row, first pos 8, keys [0, 9))
              (seq 1, row 1, 3 rows, first pos 0, keys [0, 3))
              (padding, row 4, 2 rows, keys [0, 0))

The chunk is one length for the whole batch: ``total keys / target_items``
(at least ``min_chunk``, rounded to ``block_kv``). A decode batch of a few long
sequences thus gets many splits per sequence, a big prefill batch gets none,
and no item is much longer than the average, which balances the programs.
Because chunk >= total / target_items, the item count is bounded statically:
  items <= sum over q-blocks of (1 + keys / chunk) <= num_q_blocks + target_items.
Items are ordered heaviest q-block first so long items start early.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Columns of WorkPlan.items (one int32 row per work item).
ITEM_VALID = 0  # 1 for a real item, 0 for the padding rows past the item count
ITEM_SEQ = 1  # sequence index (clamped to a valid one for padding: it reads no keys)
ITEM_ROW0 = 2  # flat token index of the q-block's first row
ITEM_ROWS = 3  # rows of the q-block that belong to it (1..block_q)
ITEM_POS0 = 4  # position of the first row within its sequence
ITEM_KV_LO = 5  # first key of this split (a multiple of block_kv)
ITEM_KV_HI = 6  # one past the last key of this split
ITEM_SLOT = 7  # -1: write the output rows directly; else the partial-result slot
ITEM_COLS = 8

# Columns of WorkPlan.merges (one row per q-block that was split).
MERGE_VALID = 0
MERGE_ROW0 = 1
MERGE_ROWS = 2
MERGE_SLOT0 = 3  # first partial slot; the q-block's splits use consecutive slots
MERGE_COUNT = 4  # number of splits
MERGE_COLS = 8


class PlanSizes(NamedTuple):
    """Static sizes of a plan; they fix the kernels' grids and buffers."""

    num_q_blocks: int  # bound on q-blocks over all segments
    num_items: int  # work items (attention grid axis)
    num_slots: int  # partial-result slots for split q-blocks
    num_merges: int  # split q-blocks (merge grid axis)


class WorkPlan(NamedTuple):
    items: jax.Array  # i32[num_items, ITEM_COLS]
    merges: jax.Array  # i32[num_merges, MERGE_COLS]
    sizes: PlanSizes  # static


def plan_sizes(num_tokens: int, max_num_seqs: int, *, block_q: int, target_items: int) -> PlanSizes:
    """Static bounds of the plan arrays.

    Segments partition the token axis, so their q-blocks number at most
    cdiv(num_tokens, block_q) plus one partial block per non-empty segment
    (at most max_num_seqs + 1 segments, and at most num_tokens non-empty ones).
    E.g. 6 tokens, 2 seqs, block_q 4: 2 + min(3, 6) = 5 q-blocks at most.
    A split q-block has more than ``chunk`` keys, and chunk >= total keys /
    target_items, so fewer than target_items q-blocks are split and their
    splits (each fewer than 2 * keys / chunk) use fewer than 2 * target_items
    slots.
    """
    num_q_blocks = -(-num_tokens // block_q) + min(max_num_seqs + 1, num_tokens)
    num_q_blocks = max(num_q_blocks, 1)
    num_items = num_q_blocks + target_items
    num_merges = max(1, min(target_items, num_q_blocks))
    num_slots = max(1, min(2 * target_items, num_items))
    return PlanSizes(num_q_blocks, num_items, num_slots, num_merges)


def make_work_plan(
    kv_lens: jax.Array,  # i32[max_num_seqs]
    cu_q_lens: jax.Array,  # i32[max_num_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    num_tokens: int,
    block_q: int,
    block_kv: int,
    sliding_window: int | None,
    target_items: int,
    min_chunk: int,
) -> WorkPlan:
    """Builds the plan; ``target_items`` 0 disables split-KV (one item per q-block)."""
    sizes = plan_sizes(num_tokens, kv_lens.shape[0], block_q=block_q, target_items=target_items)
    max_num_seqs = kv_lens.shape[0]
    n = jnp.clip(num_seqs[0], 0, max_num_seqs)
    i32 = jnp.int32

    # Segments 0..max_num_seqs-1 are sequences (empty past num_seqs); the last
    # one is the padding tail. E.g. cu [0, 1, 4], n 2, 6 tokens:
    # starts [0, 1, 4], ends [1, 4, 6], kv [9, 3, 0].
    seg = jnp.arange(max_num_seqs, dtype=i32)
    real = seg < n
    end_real = cu_q_lens[n]
    starts = jnp.append(jnp.where(real, cu_q_lens[:-1], end_real), end_real)  # [S+1]
    ends = jnp.append(jnp.where(real, cu_q_lens[1:], end_real), num_tokens)  # [S+1]
    ends = jnp.maximum(ends, starts)
    kv_len = jnp.append(jnp.where(real, kv_lens, 0), 0)  # [S+1]
    q_len = ends - starts  # [S+1]
    is_pad_seg = jnp.arange(max_num_seqs + 1) == max_num_seqs

    # Enumerate q-blocks. E.g. q_len [1, 3, 2], block_q 4: nqb [1, 1, 1],
    # qb_end [1, 2, 3]; q-block 2 -> segment 2, local block 0.
    nqb = -(-q_len // block_q)  # [S+1]
    qb_end = jnp.cumsum(nqb)  # [S+1]
    j = jnp.arange(sizes.num_q_blocks, dtype=i32)  # [QB]
    qb_seg = jnp.minimum(jnp.searchsorted(qb_end, j, side="right"), max_num_seqs).astype(i32)
    qb_valid = j < qb_end[-1]
    local = j - (qb_end - nqb)[qb_seg]
    row0 = starts[qb_seg] + local * block_q
    rows = jnp.clip(ends[qb_seg] - row0, 0, block_q)
    pos0 = kv_len[qb_seg] - q_len[qb_seg] + local * block_q  # position of row 0
    pad_block = is_pad_seg[qb_seg]
    kv_hi = jnp.where(pad_block, 0, pos0 + rows)  # causal: the last row sees keys < kv_hi
    if sliding_window is None:
        kv_lo = jnp.zeros_like(kv_hi)
    else:
        # The first row sees keys > pos0 - window; align down to a KV block.
        kv_lo = jnp.maximum(pos0 - sliding_window + 1, 0) // block_kv * block_kv
        kv_lo = jnp.where(pad_block, 0, kv_lo)
    work = jnp.where(qb_valid, jnp.maximum(kv_hi - kv_lo, 0), 0)  # [QB] keys to visit

    if target_items > 0:
        total = jnp.sum(work)
        chunk = jnp.maximum(min_chunk, -(-total // target_items))
        chunk = -(-chunk // block_kv) * block_kv
    else:
        chunk = jnp.iinfo(i32).max // 2  # never split
    nsplit = jnp.where(qb_valid, jnp.maximum(1, -(-work // chunk)), 0)  # [QB]

    # Heaviest q-blocks first; the padding rows (work -1) go last.
    order = jnp.argsort(-jnp.where(qb_valid, work, -1), stable=True).astype(i32)  # [QB]
    ns_o = nsplit[order]
    is_split_o = ns_o > 1
    item_end = jnp.cumsum(ns_o)  # [QB]
    slot_end = jnp.cumsum(jnp.where(is_split_o, ns_o, 0))  # [QB]

    # Items. E.g. ns_o [3, 1]: items 0..2 are splits 0..2 of block order[0].
    w = jnp.arange(sizes.num_items, dtype=i32)
    w_qb = jnp.minimum(jnp.searchsorted(item_end, w, side="right"), sizes.num_q_blocks - 1)
    w_qb = w_qb.astype(i32)
    split = w - (item_end - ns_o)[w_qb]
    blk = order[w_qb]
    item_lo = kv_lo[blk] + split * chunk
    item_hi = jnp.minimum(kv_hi[blk], item_lo + chunk)
    slot = jnp.where(is_split_o[w_qb], (slot_end - ns_o)[w_qb] + split, -1)
    item_valid = w < item_end[-1]
    items = jnp.stack(
        [
            item_valid.astype(i32),
            jnp.minimum(qb_seg[blk], max_num_seqs - 1),
            row0[blk],
            rows[blk],
            pos0[blk],
            item_lo,
            item_hi,
            slot,
        ],
        axis=1,
    ).astype(i32)  # [num_items, ITEM_COLS]
    items = jnp.where(item_valid[:, None], items, 0)

    # Merges: the split q-blocks, in order. E.g. is_split_o [T, F, T]:
    # merge_end [1, 1, 2]; merge 1 -> ordered block 2.
    merge_end = jnp.cumsum(is_split_o.astype(i32))  # [QB]
    m = jnp.arange(sizes.num_merges, dtype=i32)
    m_qb = jnp.minimum(jnp.searchsorted(merge_end, m, side="right"), sizes.num_q_blocks - 1)
    m_qb = m_qb.astype(i32)
    m_blk = order[m_qb]
    merge_valid = m < merge_end[-1]
    merges = jnp.stack(
        [
            merge_valid.astype(i32),
            row0[m_blk],
            rows[m_blk],
            (slot_end - ns_o)[m_qb],
            ns_o[m_qb],
        ]
        + [jnp.zeros_like(m)] * (MERGE_COLS - 5),
        axis=1,
    ).astype(i32)  # [num_merges, MERGE_COLS]
    merges = jnp.where(merge_valid[:, None], merges, 0)
    return WorkPlan(items, merges, sizes)
