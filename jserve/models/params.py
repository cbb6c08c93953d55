"""Weight declarations: each weight is declared once, and init, shardings and
the checkpoint mapping are all derived from that declaration.

A declaration (``ParamSpec``) holds the shape, the logical axis names (which
``sharding/`` maps onto mesh axes), the initializer, and where the tensor
comes from in a Hugging Face checkpoint (``checkpoints.source.HFSource``).
A declarations tree is nested dicts (and a list for the layers) with a
``ParamSpec`` at each leaf; every derived tree (params, shardings) has the
same structure, so ``jax.tree_util.tree_map`` pairs them up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from checkpoints.source import HFSource

# A parameter tree is nested dicts (and a list for the layers) of arrays.
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name (or None) per dimension
    init: str  # "normal" | "ones" | "zeros"
    source: HFSource
    # The dims a matmul contracts (its inputs), for weights that may be quantized:
    # a per-channel scale reduces them (see jserve.models.quant). () for norms and biases.
    contract: tuple[int, ...] = ()
    # The stored dtype when it is not the model's (a quantized weight's values).
    dtype: Any = None

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def spec_dtype(spec: Any, dtype: Any) -> Any:
    """The dtype a declared weight is stored in: its own, else the model's ``dtype``."""
    own = getattr(spec, "dtype", None)
    return jnp.dtype(dtype if own is None else own)


def init_params(
    specs: Any,
    key: jax.Array,
    dtype: Any = jnp.float32,
    std: float = 0.02,
    shardings: Any = None,
) -> Any:
    """Random weights from the declarations (normal(0, std) for matrices).

    With ``shardings`` (a tree matching ``specs``) each weight is created
    directly in its placement, so a large model never lives on one device.
    """
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    keys = treedef.unflatten(list(jax.random.split(key, len(leaves))))

    def make(spec: ParamSpec, k: jax.Array, sharding: Any = None) -> jax.Array:
        dt = spec_dtype(spec, dtype)

        def create(k: jax.Array) -> jax.Array:
            if spec.init == "ones":
                return jnp.ones(spec.shape, dt)
            if spec.init == "zeros":
                return jnp.zeros(spec.shape, dt)
            return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dt)

        if sharding is None:
            return create(k)
        return jax.jit(create, out_shardings=sharding)(k)

    if shardings is None:
        return jax.tree_util.tree_map(make, specs, keys, is_leaf=is_spec)
    return jax.tree_util.tree_map(make, specs, keys, shardings, is_leaf=is_spec)
