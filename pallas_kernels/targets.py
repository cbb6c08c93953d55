"""Accelerators to compile for ahead of time, with no accelerator attached.

JAX compiles for a TPU slice it only describes (``jax.experimental.
topologies``) once libtpu is installed (``pip install 'jax[tpu]'``): a
``Mesh`` over the description's devices, set as the context mesh, makes
Mosaic and XLA compile for that chip with its real limits (VMEM, SMEM, HBM).

    mesh = tpu_mesh("v6e-4")           # 4 v6e chips, one host
    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(*abstract_args).compile()

Target names count chips the way Cloud TPU slices are named for single-core
chips (v5e-8: 8 chips) and TensorCores for v5p (v5p-8: 4 chips of 2 cores,
one device each in megacore mode); v7x exposes each of a chip's two cores as
a device (tpu7x-8: 4 chips).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    topology: str  # the name get_topology_desc takes, e.g. "v6e:2x2"
    chip_config: str  # "default" or "megacore"
    host_bounds: tuple[int, int, int]
    generation: str  # pltpu.get_tpu_info().chip_version
    hbm_bytes: int  # per device
    hbm_bandwidth: float  # bytes/s per device (published peak)
    peak_bf16_flops: float  # flop/s per device (published peak)


_GIB = 1024**3
TPU_TARGETS: dict[str, TpuTarget] = {
    "v5e-1": TpuTarget("v5e:1x1", "default", (1, 1, 1), "v5e", 16 * _GIB, 819e9, 197e12),
    "v5e-4": TpuTarget("v5e:2x2", "default", (2, 2, 1), "v5e", 16 * _GIB, 819e9, 197e12),
    "v5e-8": TpuTarget("v5e:2x4", "default", (2, 4, 1), "v5e", 16 * _GIB, 819e9, 197e12),
    "v6e-1": TpuTarget("v6e:1x1", "default", (1, 1, 1), "v6e", 32 * _GIB, 1640e9, 918e12),
    "v6e-4": TpuTarget("v6e:2x2", "default", (2, 2, 1), "v6e", 32 * _GIB, 1640e9, 918e12),
    "v6e-8": TpuTarget("v6e:2x4", "default", (2, 4, 1), "v6e", 32 * _GIB, 1640e9, 918e12),
    "v5p-8": TpuTarget("v5:2x2x1", "megacore", (2, 2, 1), "v5p", 95 * _GIB, 2765e9, 459e12),
    "tpu7x-2": TpuTarget("tpu7x:1x1x1", "default", (1, 1, 1), "7x", 96 * _GIB, 3690e9, 1153e12),
    "tpu7x-8": TpuTarget("tpu7x:2x2x1", "default", (2, 2, 1), "7x", 96 * _GIB, 3690e9, 1153e12),
}


def tpu_devices(target: str) -> list:
    """The devices of a described TPU slice (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    if target not in TPU_TARGETS:
        raise ValueError(f"unknown TPU target {target!r}; known: {', '.join(TPU_TARGETS)}")
    t = TPU_TARGETS[target]
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=t.topology,
        chip_config_name=t.chip_config,
        chips_per_host_bounds=t.host_bounds,
        num_slices=1,
        wrap=(False, False, False),
    )
    return list(desc.devices)


def tpu_mesh(target: str, shape: tuple[int, ...] | None = None, axes: tuple[str, ...] = ("x",)):
    """A mesh over the target's devices (the first prod(shape) of them)."""
    devices = tpu_devices(target)
    shape = shape or (len(devices),)
    n = int(np.prod(shape))
    if n > len(devices):
        raise ValueError(f"{target} has {len(devices)} devices; a {shape} mesh needs {n}")
    return Mesh(np.asarray(devices[:n]).reshape(shape), axes)


# XLA's description of an H100 SXM (GpuTargetConfigProto in text form), from
# NVIDIA's published figures: 132 SMs, 228 KiB shared memory and 64K
# registers per SM, 3.35 TB/s, 50 MiB L2, compute capability 9.0.
H100_HBM_BANDWIDTH = 3_352_320_000_000  # bytes/s
H100_PEAK_BF16_FLOPS = 989e12  # dense
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: BANDWIDTH
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
""".replace("BANDWIDTH", str(H100_HBM_BANDWIDTH))
H100_REGISTERS_PER_SM = 65536


def h100_devices(num_gpus: int = 1) -> list:
    """H100s for a deviceless compile (needs the CUDA plugin and ptxas, no GPU;
    run with JAX_PLATFORMS=cpu). XLA's own matmuls get untuned defaults (no
    autotuning without a device); Pallas kernels are compiled exactly as on
    the GPU."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        "h100", "cuda", target_config=H100_TARGET_CONFIG, topology=f"1x1x{num_gpus}"
    )
    return list(desc.devices)[:num_gpus]


def h100_mesh(num_gpus: int = 1, axes: tuple[str, ...] = ("x",)):
    """A mesh over ``h100_devices`` (the first axis takes all of them)."""
    devices = h100_devices(num_gpus)
    return Mesh(np.asarray(devices).reshape(len(devices), *([1] * (len(axes) - 1))), axes)


def attention_args(
    num_tokens: int,
    heads: tuple[int, int],  # (q heads, KV heads)
    *,
    head_dim: int = 128,
    dtype: Any = jnp.bfloat16,
    page_size: int = 16,
    max_num_seqs: int = 64,
    pages_per_seq: int = 1024,
    num_pages: int = 4096,
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract arguments of ``ragged_paged_attention`` (q, kv_pages, kv_lens,
    page_indices, cu_q_lens, num_seqs) to compile a kernel for a target."""
    num_q_heads, num_kv_heads = heads
    i32 = jnp.int32
    return (
        jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((num_pages, page_size, 2 * num_kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((max_num_seqs,), i32),
        jax.ShapeDtypeStruct((max_num_seqs, pages_per_seq), i32),
        jax.ShapeDtypeStruct((max_num_seqs + 1,), i32),
        jax.ShapeDtypeStruct((1,), i32),
    )
