"""Quantized KV cache pages: fp8 (float8_e4m3fn) or int8, one K and one V scale per layer.

``kv_cache_dtype="auto"`` keeps the pages in the model's dtype. "fp8" and "int8"
store ``k / k_scale`` (and ``v / v_scale``) in one byte per element: the KV write
quantizes (``pallas_kernels.write_kv_pages``) and every attention backend multiplies
the scales back in (the kernels fold ``k_scale`` into the score scale and
``v_scale`` into the output). The scales are static per layer (in
``ModelConfig.kv_cache``), so each layer's program has them as constants.

Scales: for fp8, the checkpoint's per-layer ``self_attn.k_scale`` / ``v_scale``
tensors when it has them (llm-compressor's kv_cache_scheme). Otherwise a calibration
pass over ``CALIBRATION_TOKENS`` random token ids through the model's dense forward
measures each layer's largest |K| and |V|.
int8 uses ``amax / 127``; fp8 uses 1.0 (as vLLM does without checkpoint scales),
raised to ``amax / 448`` for a layer whose values would overflow fp8's range.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jserve.errors import ConfigError
from pallas_kernels.kv_cache import FP8_MAX

KV_CACHE_DTYPES = ("auto", "fp8", "int8")
_STORAGE = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
_QMAX = {"fp8": FP8_MAX, "int8": 127.0}
CALIBRATION_TOKENS = (4, 256)  # [batch, length] of seeded random ids


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    dtype: str  # "fp8" | "int8"
    scales: tuple[tuple[float, float], ...]  # per layer (k_scale, v_scale)

    @property
    def storage(self) -> Any:
        return _STORAGE[self.dtype]


def check_kv_cache_dtype(name: Any, backend: str | None = None) -> str:
    """The validated ``kv_cache_dtype``; ConfigError for an unknown name or fp8 on a GPU
    without fp8 support (compute capability below 8.9)."""
    if name is None:
        return "auto"
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"kv_cache_dtype {name!r} is not supported; choose one of {list(KV_CACHE_DTYPES)}"
        )
    if name == "fp8" and (backend or jax.default_backend()) == "gpu":
        cap = getattr(jax.devices()[0], "compute_capability", None)
        if cap is not None and tuple(int(x) for x in str(cap).split(".")) < (8, 9):
            raise ConfigError(
                f"kv_cache_dtype 'fp8' needs a GPU with fp8 support (compute capability 8.9 "
                f"or newer, e.g. L4, H100); this one has {cap}: use kv_cache_dtype='int8'"
            )
    return name


def page_dtype(cfg: Any, dtype: Any) -> Any:
    """The KV pages' dtype: the quantized storage, else the model's ``dtype``."""
    kv = getattr(cfg, "kv_cache", None)
    return jnp.dtype(dtype) if kv is None else jnp.dtype(kv.storage)


def layer_scales(cfg: Any, layer: int) -> tuple[float | None, float | None]:
    """(k_scale, v_scale) of one layer; (None, None) for unquantized pages."""
    kv = getattr(cfg, "kv_cache", None)
    return (None, None) if kv is None else kv.scales[layer]


def calibrate(model: Any, params: Any, cfg: Any, seed: int = 0) -> list[tuple[float, float]]:
    """Each layer's (max |K|, max |V|) over seeded random token ids, through the dense
    forward (the same layers as the paged step)."""
    b, length = CALIBRATION_TOKENS
    length = min(length, cfg.max_position_embeddings)
    ids = jax.random.randint(jax.random.key(seed), (b, length), 0, cfg.vocab_size)

    @jax.jit
    def run(params: Any, ids: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        x = model.embed(params, cfg, ids)
        out = []
        for i, lp in enumerate(params["layers"]):
            dense = model.dense_attend(cfg, cfg.sliding_windows[i])

            def attend(q, k, v, state, dense=dense):
                o, _ = dense(q, k, v, None)
                return o, jnp.stack([jnp.max(jnp.abs(k)), jnp.max(jnp.abs(v))])

            x, amax = model.decoder_layer(lp, cfg, x, positions, attend, None, None)
            out.append(amax)
        return jnp.stack(out).astype(jnp.float32)

    amax = np.asarray(run(params, ids))
    return [(float(k), float(v)) for k, v in amax]


def scales_for(dtype: str, amax: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Per-layer (k_scale, v_scale) from calibrated maxima (see the module docstring)."""
    qmax = _QMAX[dtype]

    def one(a: float) -> float:
        a = max(a, 1e-6)
        return a / qmax if dtype == "int8" else max(1.0, a / qmax)

    return tuple((one(k), one(v)) for k, v in amax)


def checkpoint_scales(model_dir: str | None, cfg: Any) -> tuple[tuple[float, float], ...] | None:
    """Per-layer (k_scale, v_scale) stored in a checkpoint (``model.layers.{i}.self_attn.
    k_scale`` / ``v_scale``, as llm-compressor's kv_cache_scheme writes them), or None."""
    if model_dir is None or not glob.glob(os.path.join(model_dir, "*.safetensors")):
        return None
    from checkpoints.safetensors_reader import SafetensorsReader

    with SafetensorsReader(model_dir) as reader:
        names = reader.names()
        keys = [
            (f"model.layers.{i}.self_attn.k_scale", f"model.layers.{i}.self_attn.v_scale")
            for i in range(cfg.num_layers)
        ]
        if not all(k in names and v in names for k, v in keys):
            return None

        def one(name: str) -> float:
            return float(np.asarray(reader.get(name), np.float32).max())

        return tuple((one(k), one(v)) for k, v in keys)


def with_kv_cache(
    model: Any, params: Any, cfg: Any, kv_cache_dtype: str | None, model_dir: str | None = None
) -> Any:
    """``cfg`` with ``kv_cache`` set for ``kv_cache_dtype``: fp8 scales from the checkpoint
    when it has them, else calibrated (see the module docstring)."""
    name = check_kv_cache_dtype(kv_cache_dtype)
    if name == "auto":
        return cfg
    scales = checkpoint_scales(model_dir, cfg) if name == "fp8" else None
    if scales is None:
        scales = scales_for(name, calibrate(model, params, cfg))
    return cfg.replace(kv_cache=KVCacheConfig(name, scales))


def describe_kv(cfg: Any, dtype: Any) -> str:
    kv = getattr(cfg, "kv_cache", None)
    return jnp.dtype(dtype).name if kv is None else f"{kv.dtype} (per-layer scales)"


__all__ = ["KVCacheConfig", "check_kv_cache_dtype", "layer_scales", "page_dtype"]
