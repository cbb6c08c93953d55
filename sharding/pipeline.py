"""Placing layers on pipeline stages.

Layers are loaded one at a time onto the devices of their stage (a
sub-mesh), then each layer slot j of every stage is stacked into one array
with a leading ``stage`` axis, [pp, ...], sharded over the stage axis. The
stacking reuses each device's buffer, so no stage ever holds another
stage's layers.

E.g. 8 layers, pp=2: stage 0 holds layers 0-3, stage 1 layers 4-7; stacked
slot j=1 is [layer 1, layer 5].
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.errors import ConfigError
from sharding.mesh import STAGE
from sharding.rules import kv_pages_sharding, logical_to_spec, param_shardings


def layers_per_stage(num_layers: int, mesh: Mesh) -> int:
    return num_layers // mesh.shape[STAGE]


def stage_submesh(mesh: Mesh, stage: int) -> Mesh:
    return Mesh(mesh.devices[stage : stage + 1], mesh.axis_names)


def pipeline_param_shardings(specs: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Shardings for the per-layer tree: layer i on its stage's devices; the rest everywhere."""
    lps = layers_per_stage(len(specs["layers"]), mesh)
    out = param_shardings({k: v for k, v in specs.items() if k != "layers"}, mesh)
    out["layers"] = [
        param_shardings(layer, stage_submesh(mesh, i // lps))
        for i, layer in enumerate(specs["layers"])
    ]
    return out


def _stack(arrays: list[jax.Array], mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """[pp] arrays, array s on stage s's devices -> one [pp, ...] array over the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec(STAGE, *spec))
    shape = (len(arrays), *arrays[0].shape)
    buffers = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        stage = index[0].start or 0
        local = next(s for s in arrays[stage].addressable_shards if s.device == device)
        buffers.append(jax.device_put(local.data[None], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, buffers)


def stack_stages(params: dict[str, Any], specs: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """{"layers": [L layers]} -> {"stages": [L/pp slots, each leaf [pp, ...]]}."""
    layers = params["layers"]
    pp = mesh.shape[STAGE]
    lps = len(layers) // pp
    stages = []
    for j in range(lps):
        slot = {}
        for name, spec in specs["layers"][j].items():
            group = [layers[s * lps + j][name] for s in range(pp)]
            slot[name] = _stack(group, mesh, logical_to_spec(spec.axes))
            for s in range(pp):
                layers[s * lps + j][name] = None  # drop the per-layer buffers
        stages.append(slot)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["stages"] = stages
    return out


def pipeline_kv_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages per layer slot: [pp, P, S, 2*Hkv, D], stage-split, KV heads over ``model``."""
    return NamedSharding(mesh, PartitionSpec(STAGE, *kv_pages_sharding(mesh).spec))


def uniform_stage_windows(windows: tuple[int | None, ...], pp: int) -> tuple[int | None, ...]:
    """Sliding window per layer slot; every stage's layer j must share it."""
    lps = len(windows) // pp
    grid = np.array(windows, dtype=object).reshape(pp, lps)
    for j in range(lps):
        if len(set(grid[:, j])) != 1:
            raise ConfigError(
                "pipeline parallelism needs every stage to have the same attention layout; "
                f"layer slot {j} has sliding windows {list(grid[:, j])} across stages"
            )
    return tuple(grid[0])
