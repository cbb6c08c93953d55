"""The only table from logical axis names to mesh axes.

Model code names logical axes (``ParamSpec.axes``); this module turns them
into ``PartitionSpec``s for a mesh. It takes the model's declarations tree as
an argument and reads only each leaf's ``shape`` and ``axes`` (``AxesSpec``). Tensor parallelism splits attention
heads, MLP hidden units and the vocabulary over ``model`` (and, under expert
parallelism, the experts of a mixture-of-experts layer); everything else is
replicated.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.errors import ConfigError
from sharding.mesh import MODEL


class AxesSpec(Protocol):
    """What sharding reads of a weight declaration (e.g. jserve.models.params.ParamSpec)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def axes(self) -> tuple[str | None, ...]: ...


LOGICAL_RULES: dict[str, str | None] = {
    "vocab": MODEL,
    "embed": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    # Mixture-of-experts weights [X, ...] under expert parallelism: each device
    # holds whole experts (without it, experts split over "mlp" like the MLP).
    "expert": MODEL,
    # The combined K/V head axis of the KV pages ([P, S, 2*Hkv, D]): head h's
    # K and V sit at 2h and 2h+1, so contiguous shards keep them together.
    "kv_pages_heads": MODEL,
}


def logical_to_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """E.g. ("embed", "kv_heads", None, "head_dim") -> PartitionSpec(None, "model", None, None)."""
    rules = LOGICAL_RULES
    mesh_axes: list[str | None] = []
    for name in axes:
        if name is not None and name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule")
        mesh_axes.append(None if name is None else rules[name])
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ConfigError(
            f"logical axes {axes} map two dimensions onto the same mesh axis ({mesh_axes})"
        )
    return PartitionSpec(*mesh_axes)


def check_divisible(path: str, spec: AxesSpec, mesh: Mesh) -> None:
    pspec = logical_to_spec(spec.axes)
    for dim, axis in zip(spec.shape, pspec, strict=False):
        if axis is not None and dim % mesh.shape[axis]:
            raise ConfigError(
                f"weight {path} of shape {spec.shape} cannot be split: dimension {dim} is not "
                f"divisible by the {mesh.shape[axis]} devices of mesh axis {axis!r}; choose a "
                "tensor_parallel_size that divides it"
            )


def param_shardings(specs: Any, mesh: Mesh) -> Any:
    """A NamedSharding per weight, in the structure of the declarations."""

    def one(path: jax.tree_util.KeyPath, spec: AxesSpec) -> NamedSharding:
        check_divisible(jax.tree_util.keystr(path, simple=True, separator="."), spec, mesh)
        return NamedSharding(mesh, logical_to_spec(spec.axes))

    return jax.tree_util.tree_map_with_path(one, specs)


def kv_pages_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec((None, None, "kv_pages_heads", None)))
