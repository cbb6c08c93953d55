"""Rotary position embeddings (the "rotate half" layout Hugging Face uses)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[D/2] float32 inverse frequencies, with Llama-3 scaling when configured.

    Llama-3 scaling keeps high frequencies (short wavelengths), divides low
    frequencies by ``factor``, and blends smoothly between the two bands.
    """
    # float32 throughout, as transformers computes it, so positions far into
    # the context rotate by exactly the same angles.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / (np.float32(theta) ** exponent)
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotates ``x`` [..., H, D] by ``positions`` [...] (any leading shape)."""
    inv = jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [..., D/2]
    cos = jnp.cos(angles).astype(x.dtype)[..., None, :]  # [..., 1, D/2]
    sin = jnp.sin(angles).astype(x.dtype)[..., None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)  # [..., H, D/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
