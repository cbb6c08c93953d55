"""Loading Hugging Face model directories into jserve's parameter tree."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from checkpoints.safetensors_reader import SafetensorsReader
from jserve.config import ModelConfig
from jserve.errors import CheckpointError
from jserve.models import llama
from jserve.models.params import ParamSpec, iter_leaves, iter_specs, map_specs


def _build(reader: SafetensorsReader, path: str, spec: ParamSpec, dtype: Any) -> np.ndarray:
    tensors = [reader.get(name) for name in spec.source.names]
    shapes = ", ".join(f"{n} {t.shape}" for n, t in zip(spec.source.names, tensors, strict=True))
    try:
        value = spec.source.build(*tensors)
    except ValueError:
        value = None
    if value is None or tuple(value.shape) != spec.shape:
        raise CheckpointError(
            f"shape mismatch: checkpoint tensors {shapes} do not form jserve weight {path} of "
            f"shape {spec.shape} implied by config.json; the config and weights do not belong "
            "together"
        )
    return value.astype(dtype, copy=False)


def check_tensors_present(reader: SafetensorsReader, specs: Any) -> None:
    available = reader.names()
    missing = [
        name for _, spec in iter_specs(specs) for name in spec.source.names if name not in available
    ]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint in {reader.model_dir} is missing tensors the config needs: "
            f"{', '.join(missing[:5])}{more}"
        )


def load_hf_params(
    model_dir: str | os.PathLike[str],
    cfg: ModelConfig,
    dtype: Any,
    shardings: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reads, converts and places each weight in turn.

    Only one weight's source tensors are on the host at a time; each is moved
    to the device (with its sharding, when given) before the next is read.
    """
    specs = llama.param_specs(cfg)
    flat_shardings = dict(iter_leaves(shardings)) if shardings is not None else {}
    with SafetensorsReader(model_dir) as reader:
        check_tensors_present(reader, specs)
        total = sum(1 for _ in iter_specs(specs))
        bar = tqdm(total=total, desc="loading weights", disable=not progress, unit="w")

        def load(path: str, spec: ParamSpec) -> jax.Array:
            value = _build(reader, path, spec, dtype)
            sharding = flat_shardings.get(path)
            if sharding is None:
                out = jax.device_put(value)
            else:
                # Each addressable device gets its slice (also across processes).
                out = jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
            bar.update(1)
            return out

        params = map_specs(load, specs)
        bar.close()
    return params
