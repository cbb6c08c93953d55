"""Meshes and partition rules: where every weight and KV page lives.

This package does not import ``jserve`` (nor ``checkpoints``): it takes the
weight declarations tree or the model sizes as arguments. Its errors are
``ConfigError`` (re-exported as ``jserve.ConfigError``).
"""

from sharding.errors import ConfigError
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
    "ConfigError",
    "ParallelConfig",
    "describe_mesh",
    "kv_pages_sharding",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
]
