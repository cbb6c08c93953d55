"""GPU split-KV merge: combines the partial results of split q-blocks.

Each split s of a q-block left a normalised output o_s and its base-2
log-sum-exp lse_s per row. The exact attention over the union of the splits is
  out = sum_s 2^(lse_s - L) * o_s,   L = log2(sum_s 2^lse_s),
computed here online over the splits (running max, like the attention loop),
so the number of splits needs no static bound.

Grid (num_kv_heads, num_merges); the output buffer is aliased in and only the
rows of split q-blocks are written, so the rows the attention kernel wrote
directly stay as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuned_block_sizes as tuned
from pallas_kernels import work_plan as wp
from pallas_kernels.cost import merge_cost


def _merge_kernel(
    merges_ref,  # i32[num_merges, MERGE_COLS]
    part_o_ref,  # f32[num_slots, Hkv, M, Dp]
    part_lse_ref,  # f32[num_slots, Hkv, M]
    o_in_ref,  # [T, Hq, D], aliased to o_ref
    o_ref,  # [T, Hq, D]
    *,
    group: int,
    group_p: int,
):
    del o_in_ref  # same buffer as o_ref
    h = pl.program_id(0)
    i = pl.program_id(1)
    _, _, num_rows, head_dim_p = part_o_ref.shape
    head_dim = o_ref.shape[2]

    @pl.when(merges_ref[i, wp.MERGE_VALID] > 0)
    def _():
        row0 = merges_ref[i, wp.MERGE_ROW0]
        rows = merges_ref[i, wp.MERGE_ROWS]
        slot0 = merges_ref[i, wp.MERGE_SLOT0]
        count = merges_ref[i, wp.MERGE_COUNT]
        r = jnp.arange(num_rows, dtype=jnp.int32)  # [M]
        d = jnp.arange(head_dim_p, dtype=jnp.int32)  # [Dp]

        def body(s, carry):
            m, denom, acc = carry  # [M], [M], [M, Dp]
            lse = plgpu.load(part_lse_ref.at[slot0 + s, h, r])  # [M]
            o = plgpu.load(part_o_ref.at[slot0 + s, h, r[:, None], d[None, :]])  # [M, Dp]
            m_new = jnp.maximum(m, lse)
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows empty in every split so far
            alpha = jnp.exp2(m - m_safe)
            beta = jnp.exp2(lse - m_safe)
            return m_new, denom * alpha + beta, acc * alpha[:, None] + o * beta[:, None]

        init = (
            jnp.full((num_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows, head_dim_p), jnp.float32),
        )
        _, denom, acc = lax.fori_loop(0, count, body, init)
        out = acc * jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)[:, None]
        r_tok = r // group_p
        r_head = r % group_p
        live = (r_tok < rows) & (r_head < group)
        plgpu.store(
            o_ref.at[(row0 + r_tok)[:, None], (h * group + r_head)[:, None], d[None, :]],
            out.astype(o_ref.dtype),
            mask=live[:, None] & (d < head_dim)[None, :],
        )


def merge_partials(
    out: jax.Array,  # [T, Hq, D]: rows of unsplit q-blocks already final
    part_o: jax.Array,  # f32[num_slots, Hkv, M, Dp]
    part_lse: jax.Array,  # f32[num_slots, Hkv, M]
    merges: jax.Array,  # i32[num_merges, MERGE_COLS]
    *,
    group: int,
    group_p: int,
    interpret: bool = False,
) -> jax.Array:
    """Writes the merged rows of every split q-block into ``out`` (in place)."""
    num_kv_heads, num_rows, head_dim_p = part_o.shape[1:]
    # One thread holds a [M, Dp] f32 tile's share twice (the running sum and a
    # split's output): 64 elements of each per thread keep that in registers.
    # E.g. M 128, Dp 128 needs 8 warps; with 4 ptxas spilled (H100, sm_90a).
    num_warps = max(4, min(16, tuned.next_pow2(num_rows * head_dim_p // (32 * 64))))
    return pl.pallas_call(
        functools.partial(_merge_kernel, group=group, group_p=group_p),
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        grid=(num_kv_heads, merges.shape[0]),
        input_output_aliases={3: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        cost_estimate=merge_cost(merges, part_o, part_lse, out=out),
        name="ragged_paged_attention_merge_triton",
    )(merges, part_o, part_lse, out)
