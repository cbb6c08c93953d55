"""The kernels lower for their real platforms, without the hardware.

Lowering runs Pallas's Triton / Mosaic lowering, which enforces constraints
interpret mode does not (power-of-two tiles for Triton, supported primitives
and memory spaces for Mosaic). It stops before the device compilers (ptxas,
libtpu), so it proves the kernel is expressible, not that it compiles or is
fast. Skipped where this jaxlib cannot lower for the platform without a
device (e.g. jax 0.11's Triton lowering asks the GPU for its model).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from tests.pallas_kernels.batches import make_batch

# Messages of errors that mean "cannot lower here", not "the kernel is wrong".
_UNAVAILABLE = (
    "No supported GPU devices",
    "Unsupported TPU device kind",
    "not supported on this platform",
    "Unknown backend",
)


def _target_device(platform: str):
    """On jax >= 0.11 Triton lowering reads the GPU model from the device or,
    without one, from an abstract mesh's device: pretend to target an H100.
    jax 0.10 needs nothing (it assumes compute capability 9.0)."""
    if platform != "cuda":
        return contextlib.nullcontext()
    try:
        device = jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100", num_cores=132, platform="gpu"
        )
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        return jax.sharding.use_abstract_mesh(mesh)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


def _lower_text(fn, args, platform: str) -> str:
    try:
        with _target_device(platform):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    except Exception as e:  # re-raised below unless it means "cannot lower here"
        if any(m in str(e) for m in _UNAVAILABLE) or isinstance(e, (ImportError, AttributeError)):
            pytest.skip(f"cannot lower for {platform} on this jaxlib: {e}")
        raise
    return lowered.as_text()


GPU_CASES = {
    "bf16_d128_gqa4_window_softcap": dict(
        heads=(8, 2), head_dim=128, dtype=jnp.bfloat16, page_size=16,
        kw=dict(sliding_window=64, soft_cap=30.0, block_q=4, block_kv=64,
                tuning={"target_items": 16}),
    ),
    "f32_d64_group3_page8": dict(
        heads=(6, 2), head_dim=64, dtype=jnp.float32, page_size=8,
        kw=dict(k_scale=0.5, v_scale=2.0),
    ),
    "bf16_tuned_defaults_decode": dict(
        heads=(32, 8), head_dim=128, dtype=jnp.bfloat16, page_size=16, kw={},
    ),
}  # fmt: skip


def _batch(spec):
    return make_batch(
        [(1, 200), (30, 90), (1, 33)],
        num_q_heads=spec["heads"][0],
        num_kv_heads=spec["heads"][1],
        head_dim=spec["head_dim"],
        page_size=spec["page_size"],
        dtype=spec["dtype"],
    )


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_kernel_lowers_for_cuda(name: str) -> None:
    spec = GPU_CASES[name]
    fn = functools.partial(
        pallas_kernels.ragged_paged_attention, backend="pallas_gpu", **spec["kw"]
    )
    text = _lower_text(fn, _batch(spec).args(), "cuda")
    assert "triton" in text
    if "tuning" in spec["kw"]:
        assert "ragged_paged_attention_merge_triton" in text, "the merge kernel is lowered too"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_for_tpu(dtype) -> None:
    spec = dict(heads=(8, 2), head_dim=128, dtype=dtype, page_size=16)
    fn = functools.partial(
        pallas_kernels.ragged_paged_attention,
        backend="pallas_tpu",
        sliding_window=64,
        soft_cap=30.0,
        block_q=16,
        block_kv=32,
    )
    text = _lower_text(fn, _batch(spec).args(), "tpu")
    assert "tpu_custom_call" in text
