"""The attention interface the model calls: write new K/V into pages, then
ragged paged attention over them. The backend is chosen by name.

Under tensor parallelism (a mesh whose head axis has more than one device)
both steps run inside ``jax.shard_map`` over the heads: each device writes
and attends over its own KV heads and their query heads, so no device ever
sees another's pages. XLA cannot partition a Pallas kernel by itself (Mosaic
refuses; Triton and the interpreters are replicated, gathering the whole
page pool every step), and the head split needs no communication: attention
is independent per head and the GQA ratio is the same on every shard.
"""

from __future__ import annotations

import jax
from flax import struct
from jax.sharding import Mesh, PartitionSpec

import pallas_kernels
from sharding.rules import logical_to_spec


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
    # The mesh the model runs on (None: one device); static. Attention is
    # split over its head axis when that axis has more than one device.
    mesh: Mesh | None = struct.field(pytree_node=False, default=None)


# Shardings of the attention operands under tensor parallelism, from the one
# table of logical axes: heads split, the token axis and metadata replicated.
_Q_SPEC = logical_to_spec((None, "q_heads", None))  # [T, Hq, D]
_KV_SPEC = logical_to_spec((None, "kv_heads", None))  # [T, Hkv, D]
_PAGES_SPEC = logical_to_spec((None, None, "kv_pages_heads", None))  # [P, S, 2*Hkv, D]
_HEAD_AXIS = _Q_SPEC[1]


def head_shards(mesh: Mesh | None) -> int:
    """Devices the attention heads are split over (1: no split)."""
    if mesh is None or _HEAD_AXIS not in mesh.shape:
        return 1
    return mesh.shape[_HEAD_AXIS]


def paged_attention(
    q: jax.Array,  # [T, Hq, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D]
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Stores this step's K/V, then attends; returns ([T, Hq, D], new kv_pages).
    Quantized pages hold K / k_scale and V / v_scale (jserve.models.kv_quant)."""

    def local(q, k, v, kv_pages, md):
        kv_pages = pallas_kernels.write_kv_pages(kv_pages, k, v, md.slot_mapping, k_scale, v_scale)
        out = pallas_kernels.ragged_paged_attention(
            q,
            kv_pages,
            md.kv_lens,
            md.page_indices,
            md.cu_q_lens,
            md.num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
            backend=md.backend,
        )
        return out, kv_pages

    shards = head_shards(md.mesh)
    if shards == 1:
        return local(q, k, v, kv_pages, md)
    num_kv_heads = k.shape[1]
    if num_kv_heads % shards or q.shape[1] % shards:
        raise ValueError(
            f"attention heads (q {q.shape[1]}, kv {num_kv_heads}) cannot be split over the "
            f"{shards} devices of mesh axis {_HEAD_AXIS!r}; KV heads must be repeated up to the "
            "tensor-parallel size (ModelConfig.with_kv_heads_for)"
        )
    # Inside another shard_map (the pipeline's, manual over "stage") the
    # context mesh has that axis manual already and shard_map must be given
    # that mesh. Axes of size 1 are made manual too (it costs nothing): the
    # TPU interpreter's callbacks need a wholly manual computation.
    ctx = jax.sharding.get_abstract_mesh()
    mesh = md.mesh if ctx.empty else ctx
    manual = {_HEAD_AXIS} | {a for a in mesh.axis_names if mesh.shape[a] == 1}
    replicated = PartitionSpec()
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(_Q_SPEC, _KV_SPEC, _KV_SPEC, _PAGES_SPEC, replicated),
        out_specs=(_Q_SPEC, _PAGES_SPEC),
        axis_names=manual,
        # The kernels are opaque to the replication checker; nothing in
        # here communicates, so there is nothing for it to verify.
        check_vma=False,
    )
    return fn(q, k, v, kv_pages, md)
