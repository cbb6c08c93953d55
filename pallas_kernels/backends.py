"""Backend names and the choice of one for "auto"."""

from __future__ import annotations

import jax

XLA = "xla"  # plain XLA ops (xla.py); runs anywhere
PALLAS_GPU = "pallas_gpu"  # Pallas + Triton lowering (triton_attention.py)
PALLAS_GPU_INTERPRET = "pallas_gpu_interpret"  # the same kernel in Pallas's interpreter
PALLAS_TPU = "pallas_tpu"  # Pallas + Mosaic TPU lowering (tpu_attention.py)
PALLAS_TPU_INTERPRET = "pallas_tpu_interpret"  # the same kernel in the TPU interpreter
AUTO = "auto"  # one of the above from the default platform

BACKENDS = (AUTO, XLA, PALLAS_GPU, PALLAS_GPU_INTERPRET, PALLAS_TPU, PALLAS_TPU_INTERPRET)


def resolve_backend(backend: str) -> str:
    """Maps "auto" to a concrete backend; raises ValueError for unknown names.

    GPU (CUDA or ROCm) -> pallas_gpu, TPU -> pallas_tpu, anything else
    (CPU) -> xla: interpreting a kernel is for tests, not for serving.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != AUTO:
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return PALLAS_GPU
    if platform == "tpu":
        return PALLAS_TPU
    return XLA
