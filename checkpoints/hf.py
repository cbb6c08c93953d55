"""Loading Hugging Face model directories into jserve's parameter tree.

The caller passes the model's weight declarations (``specs``, a tree whose
leaves have ``shape`` and ``source``); the result has the same structure.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from checkpoints.errors import CheckpointError
from checkpoints.safetensors_reader import SafetensorsReader
from checkpoints.source import WeightSpec, named_leaves


def check_tensors(reader: SafetensorsReader, specs: Any) -> None:
    """Every tensor the config needs is present with the shape the config implies."""
    available = reader.names()
    declared = named_leaves(specs)
    missing = [name for _, spec in declared for name in spec.source.names if name not in available]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint in {reader.model_dir} is missing tensors the config needs: "
            f"{', '.join(missing[:5])}{more}"
        )
    for path, spec in declared:
        for name, want in zip(spec.source.names, spec.source.shapes, strict=False):
            got = reader.shape(name)
            if got != want:
                raise CheckpointError(
                    f"shape mismatch: checkpoint tensor {name} has shape {got} but config.json "
                    f"implies {want} (for jserve weight {path}); the config and weights do not "
                    "belong together"
                )


def _dtype(spec: WeightSpec, dtype: Any) -> Any:
    """A declaration's own dtype (e.g. a quantized weight's int8 values), else ``dtype``."""
    own = getattr(spec, "dtype", None)
    return dtype if own is None else own


def _whole(reader: SafetensorsReader, spec: WeightSpec, dtype: Any) -> np.ndarray:
    value = spec.source.build(*(reader.get(name) for name in spec.source.names))
    return value.astype(_dtype(spec, dtype), copy=False)


def _piece(
    reader: SafetensorsReader,
    spec: WeightSpec,
    index: tuple[slice, ...],
    dtype: Any,
    whole: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """Just ``index`` of a weight, reading only the slices of the tensors it needs. A
    source that cannot read slices builds the whole weight (``whole()``, which the loader
    caches so every device's piece comes from one read) and cuts ``index`` from it."""
    index = tuple(
        slice(*s.indices(n)[:2]) for s, n in zip(index, spec.shape, strict=True)
    )  # concrete bounds
    if spec.source.read_slice is not None:
        try:
            value = spec.source.read_slice(reader.get_slice, index)
            return value.astype(_dtype(spec, dtype), copy=False)
        except NotImplementedError:
            pass
    return (whole() if whole is not None else _whole(reader, spec, dtype))[index]


def load_hf_params(
    model_dir: str | os.PathLike[str],
    specs: Any,
    dtype: Any,
    shardings: Any = None,
    progress: bool = False,
    check_finite: bool = False,
) -> dict[str, Any]:
    """Reads, converts and places each weight in turn.

    On one device, one weight's source tensors are on the host at a time. With
    shardings, each device's slice is read straight from the files (safetensors
    slices), so no process ever holds a whole sharded tensor. ``check_finite``
    refuses a tensor holding NaN or infinite values (see SafetensorsReader).
    """
    with SafetensorsReader(model_dir, check_finite=check_finite) as reader:
        check_tensors(reader, specs)
        total = len(jax.tree_util.tree_leaves(specs))
        bar = tqdm(total=total, desc="loading weights", disable=not progress, unit="w")

        def load(spec: WeightSpec, sharding: Any = None) -> jax.Array:
            if sharding is None:
                out = jax.device_put(_whole(reader, spec, dtype))
            else:
                # Called once per addressable device with that device's index.
                whole = functools.cache(lambda: _whole(reader, spec, dtype))
                out = jax.make_array_from_callback(
                    spec.shape, sharding, lambda idx: _piece(reader, spec, idx, dtype, whole)
                )
            bar.update(1)
            return out

        if shardings is None:
            params = jax.tree_util.tree_map(load, specs)
        else:
            params = jax.tree_util.tree_map(load, specs, shardings)
        bar.close()
    return params
