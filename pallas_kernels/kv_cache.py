"""Writing new tokens' K and V into their pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv_pages(
    kv_pages: jax.Array,  # [P, S, 2*Hkv, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    slot_mapping: jax.Array,  # i32[T]: page * S + offset; negative for padding tokens
) -> jax.Array:
    """Scatters K and V into the interleaved page layout; returns the new pages.

    Called inside a jitted step whose ``kv_pages`` argument is donated, the
    scatter updates the pool in place. Padding tokens (negative slot) are
    dropped, so they never touch a page.
    E.g. page_size 16, slot 35 -> page 2, offset 3.
    """
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_tokens = k.shape[0]
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, combined, head_dim)  # [T, 2*Hkv, D]
    total = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)  # out of range -> dropped
    flat = kv_pages.reshape(total, combined, head_dim)
    flat = flat.at[slots].set(kv.astype(kv_pages.dtype), mode="drop")
    return flat.reshape(num_pages, page_size, combined, head_dim)
