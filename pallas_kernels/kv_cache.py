"""Writing new tokens' K and V into their pages."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def quantize_kv(x: jax.Array, scale: float | None, dtype: Any) -> jax.Array:
    """K or V as pages of ``dtype`` store them: ``x / scale``, rounded and clipped for
    int8, clipped to the finite range for float8_e4m3fn (a cast past it gives NaN).
    Without a scale, a plain cast."""
    dt = jnp.dtype(dtype)
    if scale is None:
        return x.astype(dt)
    y = x.astype(jnp.float32) / scale
    if dt == jnp.int8:
        return jnp.clip(jnp.round(y), -127, 127).astype(dt)
    if dt == jnp.dtype(jnp.float8_e4m3fn):
        return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(dt)
    return y.astype(dt)


def write_kv_pages(
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    slot_mapping: jax.Array,  # i32[T]: page * S + offset; negative for padding tokens
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> jax.Array:
    """Scatters K and V into the interleaved page layout; returns the new pages.

    Quantized pages (int8, float8_e4m3fn) store ``k / k_scale`` and ``v / v_scale``
    (see ``quantize_kv``); the attention kernels take the same scales.

    Called inside a jitted step whose ``kv_pages`` argument is donated, the
    scatter updates the pool in place. Padding tokens (negative slot) are
    dropped, so they never touch a page.
    E.g. page_size 16, slot 35 -> page 2, offset 3.
    """
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_tokens = k.shape[0]
    k = quantize_kv(k, k_scale, kv_pages.dtype)
    v = quantize_kv(v, v_scale, kv_pages.dtype)
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, combined, head_dim)  # [T, 2*Hkv, D]
    total = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)  # out of range -> dropped
    flat = kv_pages.reshape(total, combined, head_dim)
    flat = flat.at[slots].set(kv.astype(kv_pages.dtype), mode="drop")
    return flat.reshape(num_pages, page_size, combined, head_dim)
