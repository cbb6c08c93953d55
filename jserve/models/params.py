"""Weight declarations: each weight is declared once, and init, shardings and
the checkpoint mapping are all derived from that declaration.

A declaration (``ParamSpec``) holds the shape, the logical axis names (which
``sharding/`` maps onto mesh axes), the initializer, and where the tensor
comes from in a Hugging Face checkpoint (``HFSource``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# A parameter tree is nested dicts (and a list for the layers) of arrays.
Params = dict[str, Any]


# read(name, index) -> the given slice of a checkpoint tensor.
ReadFn = Callable[[str, tuple[slice, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class HFSource:
    """How to build one jserve weight from Hugging Face tensors, and back.

    ``names`` are the checkpoint keys read, with their expected ``shapes``;
    ``build`` turns those numpy arrays (in the order of ``names``) into the
    array of the declared shape. ``export`` is its inverse: the jserve array
    -> the tensors of ``names``, in that order, in Hugging Face layout (used to
    write checkpoints). ``read_slice(read, index)`` builds only ``index`` of
    the weight from slices of the tensors, so a sharded load never holds a
    whole tensor; it may raise NotImplementedError for an unusual index.
    """

    names: tuple[str, ...]
    build: Callable[..., np.ndarray]
    export: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    read_slice: Callable[[ReadFn, tuple[slice, ...]], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name (or None) per dimension
    init: str  # "normal" | "ones" | "zeros"
    source: HFSource

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def iter_specs(specs: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, ParamSpec]]:
    """Yields ("layers.3.wqkv", spec) pairs in a fixed order."""
    for key, value in specs.items():
        path = f"{prefix}{key}"
        if isinstance(value, ParamSpec):
            yield path, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from iter_specs(item, f"{path}.{i}.")
        else:
            yield from iter_specs(value, f"{path}.")


def map_specs(fn: Callable[[str, ParamSpec], Any], specs: Any, prefix: str = "") -> Any:
    """Builds a tree with the same structure as ``specs`` from ``fn(path, spec)``."""
    if isinstance(specs, ParamSpec):
        return fn(prefix.rstrip("."), specs)
    if isinstance(specs, list):
        return [map_specs(fn, s, f"{prefix}{i}.") for i, s in enumerate(specs)]
    return {k: map_specs(fn, v, f"{prefix}{k}.") for k, v in specs.items()}


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
    paths = [p for p, _ in iter_specs(specs)]
    keys = dict(zip(paths, jax.random.split(key, len(paths)), strict=True))
    flat_shardings = dict(iter_leaves(shardings)) if shardings is not None else {}

    def make(path: str, spec: ParamSpec) -> jax.Array:
        dt = jnp.dtype(dtype)

        def create(k: jax.Array) -> jax.Array:
            if spec.init == "ones":
                return jnp.ones(spec.shape, dt)
            if spec.init == "zeros":
                return jnp.zeros(spec.shape, dt)
            return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dt)

        sharding = flat_shardings.get(path)
        if sharding is None:
            return create(keys[path])
        return jax.jit(create, out_shardings=sharding)(keys[path])

    return map_specs(make, specs)


def iter_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ("layers.3.wqkv", leaf) pairs of a params-shaped tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from iter_leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), tree
