"""The model's call site (jserve.models.attention.paged_attention) works with every
CPU-runnable backend: write the step's K/V into donated pages, then attend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jserve.models.attention import AttentionMetadata, paged_attention


@pytest.mark.parametrize("backend", ["auto", "pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_paged_attention_step(backend: str) -> None:
    # Two sequences, page size 4: seq 0 decodes position 5 (kv 6), seq 1
    # prefills positions 0..2; one padding token at the end.
    page_size, hq, hkv, d = 4, 4, 2, 16
    rng = np.random.default_rng(0)
    pages = jnp.asarray(rng.standard_normal((6, page_size, 2 * hkv, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((5, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, hkv, d)), jnp.float32)
    md = AttentionMetadata(
        positions=jnp.asarray([5, 0, 1, 2, 0], jnp.int32),
        # Seq 0 owns pages [3, 1]: position 5 -> page 1 offset 1 (slot 5).
        # Seq 1 owns page [4]: positions 0..2 -> slots 16..18.
        slot_mapping=jnp.asarray([5, 16, 17, 18, -1], jnp.int32),
        kv_lens=jnp.asarray([6, 3, 0], jnp.int32),
        page_indices=jnp.asarray([[3, 1], [4, 0], [0, 0]], jnp.int32),
        cu_q_lens=jnp.asarray([0, 1, 4, 4], jnp.int32),
        num_seqs=jnp.asarray([2], jnp.int32),
        backend=backend,
    )
    expected_pages = pallas_kernels.write_kv_pages(pages, k, v, md.slot_mapping)
    expected = pallas_kernels.ref_ragged_paged_attention(
        q, expected_pages, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs, sm_scale=0.25
    )

    step = jax.jit(
        functools.partial(paged_attention, sm_scale=0.25, sliding_window=None), donate_argnums=3
    )
    out, new_pages = step(q, k, v, pages, md)
    np.testing.assert_allclose(np.asarray(new_pages), np.asarray(expected_pages))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
