"""How a model's weights map onto checkpoint tensors, and names for tree leaves.

A model declares each weight once (``jserve.models.params.ParamSpec``); the
part of that declaration this package reads is the weight's ``shape`` and its
``source``, an ``HFSource`` saying which Hugging Face tensors build it. The
checkpoint code takes the declarations tree as an argument and never imports
the model code: any leaf with those two attributes (``WeightSpec``) will do.

Trees (declarations, params, shardings) are nested dicts and lists walked with
``jax.tree_util``; a declaration is a leaf because its class is not a
registered pytree node. Leaves are named by their path, e.g. "layers.3.wqkv".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

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


class WeightSpec(Protocol):
    """What the checkpoint code reads of a weight declaration."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def source(self) -> HFSource: ...


def leaf_name(path: jax.tree_util.KeyPath) -> str:
    """A tree path as a dotted name: (DictKey('layers'), SequenceKey(3), DictKey('wqkv')) ->
    "layers.3.wqkv"."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """[("embed", leaf), ("layers.0.attn_norm", leaf), ...] in jax.tree_util's order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(leaf_name(path), leaf) for path, leaf in leaves]
