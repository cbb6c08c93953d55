"""write_kv_pages scatters new K/V into the interleaved page layout, in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels


def test_write_kv_pages_interleaves_and_drops_padding() -> None:
    num_pages, page_size, num_kv_heads, head_dim = 4, 4, 2, 8
    pages = jnp.full((num_pages, page_size, 2 * num_kv_heads, head_dim), -1.0)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, num_kv_heads, head_dim)).astype(np.float32)  # [T, Hkv, D]
    v = rng.standard_normal((3, num_kv_heads, head_dim)).astype(np.float32)
    # Token 0 -> page 2 offset 3 (slot 11), token 1 -> page 0 offset 1, token 2 is padding.
    slots = jnp.asarray([11, 1, -1], jnp.int32)

    write = jax.jit(pallas_kernels.write_kv_pages, donate_argnums=0)
    out = np.asarray(write(pages, jnp.asarray(k), jnp.asarray(v), slots))

    np.testing.assert_array_equal(out[2, 3, 0::2], k[0])  # K of head h at 2h
    np.testing.assert_array_equal(out[2, 3, 1::2], v[0])  # V of head h at 2h + 1
    np.testing.assert_array_equal(out[0, 1, 0::2], k[1])
    np.testing.assert_array_equal(out[0, 1, 1::2], v[1])
    touched = np.zeros(out.shape[:2], bool)
    touched[2, 3] = touched[0, 1] = True
    assert np.all(out[~touched] == -1.0), "padding tokens and other slots stay untouched"
