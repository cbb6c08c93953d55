"""Device meshes for tensor and pipeline parallelism.

The mesh has two named axes: ``stage`` (pipeline stages, each holding a
contiguous run of layers) and ``model`` (tensor parallelism within a stage,
Megatron / 1D weight-stationary: heads and MLP hidden units are split, and
each layer needs one all-reduce after attention and one after the MLP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.errors import ConfigError

STAGE = "stage"
MODEL = "model"


class ModelShape(Protocol):
    """The model sizes a parallel layout must divide (jserve.config.ModelConfig has them)."""

    @property
    def num_q_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Micro-batches per step under pipeline parallelism (0: one per stage).
    num_microbatches: int = 0
    # Mixture-of-experts models: split the experts over the tensor-parallel
    # devices (whole experts per device) instead of every expert's hidden units.
    enable_expert_parallel: bool = False

    @property
    def microbatches(self) -> int:
        return self.num_microbatches or self.pipeline_parallel_size

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self, cfg: ModelShape, num_devices: int) -> ParallelConfig:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        for name, v in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if tp * pp > num_devices:
            raise ConfigError(
                f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} needs {tp * pp} "
                f"devices but only {num_devices} are visible; lower the sizes"
            )
        checks = [
            ("num_attention_heads", cfg.num_q_heads),
            ("intermediate_size", cfg.intermediate_size),
        ]
        for name, value in checks:
            if value % tp:
                raise ConfigError(
                    f"{name} ({value}) is not divisible by tensor_parallel_size {tp}; choose a "
                    f"tensor_parallel_size that divides it"
                )
        hk = cfg.num_kv_heads
        if hk % tp and tp % hk:
            raise ConfigError(
                f"num_key_value_heads ({hk}) and tensor_parallel_size {tp}: one must divide "
                "the other (KV heads are split, or replicated when there are fewer than devices)"
            )
        if self.num_microbatches < 0 or self.microbatches & (self.microbatches - 1):
            raise ConfigError(
                f"num_microbatches must be a power of two (it divides the token buckets), "
                f"got {self.num_microbatches}"
            )
        if cfg.num_layers % pp:
            raise ConfigError(
                f"num_hidden_layers ({cfg.num_layers}) is not divisible by "
                f"pipeline_parallel_size {pp}"
            )
        return self


def make_mesh(parallel: ParallelConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("stage", "model") mesh over the first tp * pp devices (all processes' devices)."""
    devices = list(devices if devices is not None else jax.devices())
    n = parallel.world_size
    if n > len(devices):
        raise ConfigError(f"the mesh needs {n} devices but only {len(devices)} are visible")
    grid = np.asarray(devices[:n], dtype=object).reshape(
        parallel.pipeline_parallel_size, parallel.tensor_parallel_size
    )
    return Mesh(grid, (STAGE, MODEL))


def describe_mesh(mesh: Mesh) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in mesh.devices.flat})
    return f"mesh ({shape}) over {mesh.devices.size} x {'/'.join(kinds)}"
