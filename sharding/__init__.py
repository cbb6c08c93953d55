"""Meshes and partition rules: where every weight and KV page lives."""

from sharding.mesh import MODEL, STAGE, ParallelConfig, describe_mesh, make_mesh
from sharding.rules import (
    LOGICAL_RULES,
    kv_pages_sharding,
    logical_to_spec,
    param_shardings,
)

__all__ = [
    "LOGICAL_RULES",
    "MODEL",
    "STAGE",
    "ParallelConfig",
    "describe_mesh",
    "kv_pages_sharding",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
]
