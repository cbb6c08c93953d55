"""Ragged paged attention kernels and the KV-cache write.

``ragged_paged_attention`` follows the interface of JAX's TPU kernel
(``jax.experimental.pallas.ops.tpu.ragged_paged_attention``): one flat batch of
query tokens from many sequences, K/V in fixed-size pages of one shared pool.
The backend is chosen by name (see ``BACKENDS``); docs/kernels.md describes
each one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax

from pallas_kernels import backends
from pallas_kernels.backends import BACKENDS, resolve_backend
from pallas_kernels.kv_cache import write_kv_pages
from pallas_kernels.reference import DEFAULT_MASK_VALUE, ref_ragged_paged_attention
from pallas_kernels.tpu_attention import tpu_ragged_paged_attention
from pallas_kernels.triton_attention import triton_ragged_paged_attention
from pallas_kernels.validation import validate_static, validate_tuning, validate_values
from pallas_kernels.xla import xla_ragged_paged_attention


def ragged_paged_attention(
    q: jax.Array,  # [max_num_batched_tokens, num_q_heads, head_dim]
    kv_pages: jax.Array,  # [total_num_pages, page_size, 2*num_kv_heads, head_dim]
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
    backend: str = "xla",
    block_q: int | None = None,
    block_kv: int | None = None,
    tuning: Mapping[str, int] | None = None,
) -> jax.Array:
    """Attention of each sequence's last q_len positions over its kv_len keys (causal).

    Returns [max_num_batched_tokens, num_q_heads, head_dim] in q's dtype; rows
    past ``cu_q_lens[num_seqs]`` are zero.

    ``block_q`` (query tokens per block) and ``block_kv`` (keys per step)
    override the tuned table; ``tuning`` passes backend-specific knobs
    (pallas_gpu: num_warps, num_stages, target_items, min_chunk; pallas_tpu:
    vmem_limit_bytes). ``mask_value`` is accepted only for compatibility with
    JAX's kernel interface and ignored: every backend gives masked keys exactly
    zero weight (what the default mask value does in JAX's reference).
    """
    del mask_value
    validate_static(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    resolved = resolve_backend(backend)
    validate_tuning(resolved, block_q=block_q, block_kv=block_kv, tuning=tuning)
    validate_values(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    return _run(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
        backend=resolved,
        block_q=block_q,
        block_kv=block_kv,
        tuning=tuple(sorted((tuning or {}).items())),
    )


# Jitted so that an eager call runs one compiled program instead of dispatching
# the plan and the kernel op by op; under an outer jit it simply inlines.
@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "k_scale",
        "v_scale",
        "backend",
        "block_q",
        "block_kv",
        "tuning",
    ),
)
def _run(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    k_scale: float | None,
    v_scale: float | None,
    backend: str,
    block_q: int | None,
    block_kv: int | None,
    tuning: tuple[tuple[str, int], ...],
) -> jax.Array:
    args = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    common = dict(
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    pages_per_block = None if block_kv is None else max(1, block_kv // kv_pages.shape[1])
    if backend == backends.XLA:
        return xla_ragged_paged_attention(*args, **common, pages_per_block=pages_per_block)
    if backend in (backends.PALLAS_GPU, backends.PALLAS_GPU_INTERPRET):
        return triton_ragged_paged_attention(
            *args,
            **common,
            block_q=block_q,
            block_kv=block_kv,
            interpret=backend == backends.PALLAS_GPU_INTERPRET,
            **dict(tuning),
        )
    return tpu_ragged_paged_attention(
        *args,
        **common,
        block_q=block_q,
        pages_per_block=pages_per_block,
        interpret=backend == backends.PALLAS_TPU_INTERPRET,
        **dict(tuning),
    )


__all__ = [
    "BACKENDS",
    "DEFAULT_MASK_VALUE",
    "ragged_paged_attention",
    "ref_ragged_paged_attention",
    "resolve_backend",
    "write_kv_pages",
]
