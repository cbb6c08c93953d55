"""GPU ragged paged attention: a Pallas kernel with the Triton lowering.

Grid (num_kv_heads, num_items): one program per (KV head, work item), where a
work item is one q-block of one sequence and one split of its key range (see
work_plan.py). The program loads the q-block for *all* q heads of its KV head
as one matrix of block_q * group rows, so each K/V tile is read once per
group (GQA), and walks its keys block_kv at a time with an online softmax
(flash attention, in base 2). K and V tiles are gathered token by token
through page_indices, so pages need not be contiguous.

Rows of the q tile: row r is token r // group_p, q head r % group_p of the
group, where group_p is the group padded to a power of two (Triton tiles must
be powers of two). E.g. group 3 (padded to 4), block_q 4: rows 0..3 are token
0 with heads 0, 1, 2 and a dead row, rows 4..7 token 1, ...

Unsplit items write their rows of the output; split items write a normalised
partial output and its log-sum-exp to a slot, and triton_merge.py combines the
slots. The padding tail of the token axis is a work item with no keys, so
every output row is written (with zeros there) and nothing is left
uninitialised.

Masking: keys past kv_hi are loaded as zeros (unused page slots may hold NaN;
0 * NaN would poison the P @ V product), and scores outside the causal /
sliding-window band are -inf. Only the few KV blocks that touch a band edge
run the masked code; the interior loop skips the mask arithmetic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels import work_plan as wp
from pallas_kernels.cost import attention_cost
from pallas_kernels.triton_merge import merge_partials

LOG2E = math.log2(math.e)


def _attention_kernel(
    items_ref,  # i32[num_items, ITEM_COLS]
    page_indices_ref,  # i32[max_num_seqs, pages_per_seq]
    q_ref,  # [T, Hq, D]
    kv_ref,  # [P * page_size, 2 * Hkv, D]: token-major view of kv_pages
    o_ref,  # [T, Hq, D]
    part_o_ref,  # f32[num_slots, Hkv, M, Dp]
    part_lse_ref,  # f32[num_slots, Hkv, M]
    *,
    group: int,
    group_p: int,
    head_dim: int,
    head_dim_p: int,
    block_q: int,
    block_kv: int,
    page_size: int,
    pages_per_seq: int,
    score_scale: float,
    v_scale: float | None,
    soft_cap: float | None,
    sliding_window: int | None,
):
    h = pl.program_id(0)
    w = pl.program_id(1)
    num_tokens = q_ref.shape[0]
    num_rows = block_q * group_p

    @pl.when(items_ref[w, wp.ITEM_VALID] > 0)
    def _():
        seq = items_ref[w, wp.ITEM_SEQ]
        row0 = items_ref[w, wp.ITEM_ROW0]
        rows = items_ref[w, wp.ITEM_ROWS]
        pos0 = items_ref[w, wp.ITEM_POS0]
        kv_lo = items_ref[w, wp.ITEM_KV_LO]
        kv_hi = items_ref[w, wp.ITEM_KV_HI]
        slot = items_ref[w, wp.ITEM_SLOT]

        r = jnp.arange(num_rows, dtype=jnp.int32)  # [M]
        r_tok = r // group_p  # token of row r within the q-block
        r_head = r % group_p  # q head of row r within the group
        row_live = (r_tok < rows) & (r_head < group)  # [M]
        q_pos = pos0 + r_tok  # [M] position of each row in its sequence
        d = jnp.arange(head_dim_p, dtype=jnp.int32)  # [Dp]
        d_live = d < head_dim  # [Dp]; all True unless head_dim was padded

        # Loads clamp indices into range; masked lanes are never used anyway.
        tok = jnp.minimum(row0 + r_tok, num_tokens - 1)  # [M]
        head = h * group + jnp.minimum(r_head, group - 1)  # [M]
        q = plgpu.load(
            q_ref.at[tok[:, None], head[:, None], jnp.minimum(d, head_dim - 1)[None, :]],
            mask=row_live[:, None] & d_live[None, :],
            other=0,
        )  # [M, Dp]

        def kv_block(i, carry, *, masked: bool):
            m, denom, acc = carry  # [M], [M], [M, Dp] f32
            t = kv_lo + i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [BK] key positions
            t_live = t < kv_hi  # [BK]
            # E.g. page_size 16, t 35 -> page slot 2, offset 3.
            # t >= 0, so truncating lax.div/rem are floor ops without sign fix-ups.
            page_slot = jnp.minimum(lax.div(t, page_size), pages_per_seq - 1)
            page = plgpu.load(page_indices_ref.at[seq, page_slot], mask=t_live, other=0)  # [BK]
            kv_row = page * page_size + lax.rem(t, page_size)  # [BK] row of the token-major view
            kv_mask = t_live[:, None] & d_live[None, :]  # [BK, Dp]
            dd = jnp.minimum(d, head_dim - 1)[None, :]
            k = plgpu.load(kv_ref.at[kv_row[:, None], 2 * h, dd], mask=kv_mask, other=0)
            v = plgpu.load(kv_ref.at[kv_row[:, None], 2 * h + 1, dd], mask=kv_mask, other=0)
            k = k.astype(q.dtype)  # [BK, Dp]
            v = v.astype(q.dtype)
            s = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [M, BK]
            if soft_cap is None:
                s = s * (score_scale * LOG2E)  # one multiply: scale and base change
            else:
                s = (soft_cap * LOG2E) * jnp.tanh(s * (score_scale / soft_cap))
            if masked:
                live = t_live[None, :] & (t[None, :] <= q_pos[:, None])  # [M, BK]
                if sliding_window is not None:
                    live &= t[None, :] > q_pos[:, None] - sliding_window
                s = jnp.where(live, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [M]
            # A row with no live key yet keeps m = -inf; shift by 0 so that
            # exp2(-inf - -inf) never produces NaN.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_safe[:, None])  # [M, BK]
            alpha = jnp.exp2(m - m_safe)  # [M]
            denom = denom * alpha + jnp.sum(p, axis=1)
            pv = lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )  # [M, Dp]
            return m_new, denom, acc * alpha[:, None] + pv

        # KV blocks [0, nb) of this item; the unmasked interior is [b_in, b_out).
        # Causal: block i is free of the mask when its last key is <= the first
        # row's position and < kv_hi. Window: when its first key is > the last
        # row's position - window. E.g. kv_lo 0, kv_hi 100, pos0 70, block_kv 32,
        # no window: nb 4, b_in 0, b_out (71 // 32) = 2: blocks 2 and 3 masked.
        nb = (kv_hi - kv_lo + block_kv - 1) // block_kv
        if sliding_window is None:
            b_in = jnp.int32(0)
        else:
            first_free = pos0 + rows - 1 - sliding_window + 1 - kv_lo
            b_in = jnp.clip((first_free + block_kv - 1) // block_kv, 0, nb)
        b_out = jnp.clip((jnp.minimum(pos0 + 1, kv_hi) - kv_lo) // block_kv, b_in, nb)

        carry = (
            jnp.full((num_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows, head_dim_p), jnp.float32),
        )
        masked_body = functools.partial(kv_block, masked=True)
        carry = lax.fori_loop(0, b_in, masked_body, carry)
        carry = lax.fori_loop(b_in, b_out, functools.partial(kv_block, masked=False), carry)
        m, denom, acc = lax.fori_loop(b_out, nb, masked_body, carry)

        # Rows with no key at all (padding tail, dead rows) have l == 0: emit 0.
        inv_l = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)  # [M]
        out = acc * inv_l[:, None]  # [M, Dp]
        if v_scale is not None:
            out = out * v_scale

        @pl.when(slot < 0)
        def _():
            # Stores use exact (unclamped) indices so two lanes never alias.
            plgpu.store(
                o_ref.at[(row0 + r_tok)[:, None], (h * group + r_head)[:, None], d[None, :]],
                out.astype(o_ref.dtype),
                mask=row_live[:, None] & d_live[None, :],
            )

        @pl.when(slot >= 0)
        def _():
            plgpu.store(part_o_ref.at[slot, h, r[:, None], d[None, :]], out)
            lse = jnp.where(denom > 0, m + jnp.log2(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
            plgpu.store(part_lse_ref.at[slot, h, r], lse)


def triton_ragged_paged_attention(
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
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    target_items: int | None = None,
    min_chunk: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on GPU; returns [T, Hq, D] in q's dtype.

    Block sizes default to tuned_block_sizes.py. ``target_items`` is the
    number of work items per KV head the split-KV planner aims for (default:
    GPU_PROGRAMS_PER_SM * SMs / Hkv; 0 disables split-KV), ``min_chunk`` the
    shortest split in keys. ``interpret=True`` runs the same kernel through
    Pallas's interpreter (on CPU, for tests).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    max_num_seqs, pages_per_seq = page_indices.shape
    group = num_q_heads // num_kv_heads
    group_p = tuned.next_pow2(group)
    head_dim_p = max(16, tuned.next_pow2(head_dim))

    defaults = tuned.gpu_block_sizes(
        num_tokens=num_tokens,
        max_num_seqs=max_num_seqs,
        group=group,
        head_dim=head_dim,
        dtype_bytes=jnp.dtype(q.dtype).itemsize,
    )
    block_q = defaults.block_q if block_q is None else block_q
    block_kv = defaults.block_kv if block_kv is None else block_kv
    num_warps = defaults.num_warps if num_warps is None else num_warps
    num_stages = defaults.num_stages if num_stages is None else num_stages
    # Triton's MMA wants >= 16 rows and keys, all tile sizes powers of two.
    block_q = max(tuned.next_pow2(block_q), -(-16 // group_p))
    block_kv = max(16, tuned.next_pow2(block_kv))
    if target_items is None:
        target_items = -(-tuned.GPU_PROGRAMS_PER_SM * _num_sms() // num_kv_heads)
    min_chunk = tuned.GPU_MIN_CHUNK if min_chunk is None else min_chunk

    plan = wp.make_work_plan(
        kv_lens,
        cu_q_lens,
        num_seqs,
        num_tokens=num_tokens,
        block_q=block_q,
        block_kv=block_kv,
        sliding_window=sliding_window,
        target_items=target_items,
        min_chunk=min_chunk,
    )
    sizes = plan.sizes
    num_rows = block_q * group_p
    kv_tokens = kv_pages.reshape(-1, combined, head_dim)  # [P * page_size, 2*Hkv, D], free

    score_scale = sm_scale * (1.0 if k_scale is None else k_scale)
    kernel = functools.partial(
        _attention_kernel,
        group=group,
        group_p=group_p,
        head_dim=head_dim,
        head_dim_p=head_dim_p,
        block_q=block_q,
        block_kv=block_kv,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        score_scale=score_scale,
        v_scale=v_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    out, part_o, part_lse = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(
                (sizes.num_slots, num_kv_heads, num_rows, head_dim_p), jnp.float32
            ),
            jax.ShapeDtypeStruct((sizes.num_slots, num_kv_heads, num_rows), jnp.float32),
        ),
        grid=(num_kv_heads, sizes.num_items),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        cost_estimate=attention_cost(q, kv_pages, page_indices, kv_lens, cu_q_lens, num_seqs),
        name="ragged_paged_attention_triton",
    )(plan.items, page_indices, q, kv_tokens)

    if target_items == 0:
        return out
    return merge_partials(
        out,
        part_o,
        part_lse,
        plan.merges,
        group=group,
        group_p=group_p,
        interpret=interpret,
    )


def _num_sms() -> int:
    """SMs of the first GPU, or the table's default when none is visible."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return tuned.GPU_DEFAULT_NUM_SMS
    return getattr(gpus[0], "core_count", None) or tuned.GPU_DEFAULT_NUM_SMS
