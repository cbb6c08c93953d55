"""Quantized KV pages (fp8, int8): every CPU-runnable backend (Pallas kernels in interpret
mode) against the reference given the same pages and scales, and the quantizing write."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.kv_cache import quantize_kv
from tests.pallas_kernels.batches import make_batch

CPU_BACKENDS = ("xla", "pallas_gpu_interpret", "pallas_tpu_interpret")
SEQS = [(1, 40), (9, 9), (1, 17), (6, 30)]  # decode and prefill chunks


def _quantized_batch(dtype):
    """The batch, the same with pages quantized as the write stores them, and the scales
    (each of K and V's largest |value| over 127, as int8 calibration picks)."""
    b = make_batch(SEQS, num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=8)
    pages = np.asarray(b.kv_pages)  # K at even combined heads, V at odd ones
    k_scale = float(np.nanmax(np.abs(pages[:, :, 0::2]))) / 127
    v_scale = float(np.nanmax(np.abs(pages[:, :, 1::2]))) / 127
    scale = np.where(np.arange(pages.shape[2]) % 2 == 0, k_scale, v_scale)[None, None, :, None]
    q = quantize_kv(jnp.asarray(pages / scale), 1.0, dtype)
    return b, b._replace(kv_pages=q), k_scale, v_scale


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantized_pages_match_reference(backend: str, dtype) -> None:
    b, qb, k_scale, v_scale = _quantized_batch(dtype)
    kw = dict(sm_scale=64**-0.5, k_scale=k_scale, v_scale=v_scale)
    meta = (qb.kv_lens, qb.page_indices, qb.cu_q_lens, qb.num_seqs)
    expected = np.asarray(pallas_kernels.ref_ragged_paged_attention(qb.q, qb.kv_pages, *meta, **kw))
    out = pallas_kernels.ragged_paged_attention(
        *qb.args(), backend=backend, block_q=4, block_kv=16, **kw
    )
    n = b.num_real_tokens
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out[:n], expected[:n], atol=1e-4, rtol=1e-4)
    assert np.all(out[n:] == 0)
    # And it stays close to attention over the float pages.
    exact = np.asarray(
        pallas_kernels.ref_ragged_paged_attention(b.q, b.kv_pages, *meta, sm_scale=64**-0.5)
    )
    err = np.abs(out[:n] - exact[:n]).max() / np.abs(exact[:n]).max()
    assert err < (0.08 if dtype == jnp.float8_e4m3fn else 0.02), err


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8], ids=["fp8", "int8"])
def test_write_quantizes_with_the_layer_scales(dtype) -> None:
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((5, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, 2, 16)) * 3, jnp.float32)
    pages = jnp.zeros((4, 4, 4, 16), dtype)
    slots = jnp.array([0, 5, -1, 9, 15], jnp.int32)  # one padding token
    out = pallas_kernels.write_kv_pages(pages, k, v, slots, 0.03, 0.1)
    assert out.dtype == dtype
    flat = np.asarray(out.astype(jnp.float32)).reshape(16, 4, 16)
    for t, s in enumerate([0, 5, -1, 9, 15]):
        if s < 0:
            continue
        np.testing.assert_allclose(flat[s, 0::2] * 0.03, k[t], atol=0.03 * 0.6, rtol=0.07)
        np.testing.assert_allclose(flat[s, 1::2] * 0.1, v[t], atol=0.1 * 0.6, rtol=0.07)
    assert np.count_nonzero(flat) == 4 * 4 * 16 - np.sum(flat[[0, 5, 9, 15]] == 0)
    # Values past the storable range are clipped, never NaN.
    big = pallas_kernels.write_kv_pages(pages, k * 1e6, v, slots, 0.03, 0.1)
    assert np.isfinite(np.asarray(big.astype(jnp.float32))).all()
