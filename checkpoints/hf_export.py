"""Writing jserve parameter trees as Hugging Face model directories.

The tensor names and layouts come from the same weight declarations the
loader uses: each ``HFSource`` carries ``export``, the inverse of its
``build``, so there is no second name table to keep in sync. The caller
passes the declarations and the ``config.json`` contents
(``jserve.config.config_to_dict``); ``jserve.model_export.save_hf_checkpoint``
puts the two together for a model config.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from checkpoints.source import named_leaves

_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(ml_dtypes.bfloat16) if dtype in ("bfloat16", "bf16") else np.dtype(dtype)
    if dt not in _DTYPE_NAMES:
        raise ValueError(f"cannot save weights as {dt}; choose float32, bfloat16 or float16")
    return dt


def dtype_name(dtype: Any) -> str:
    """The name config.json gives a saved dtype: "float32", "bfloat16" or "float16"."""
    return _DTYPE_NAMES[_dtype(dtype)]


def export_tensors(params: Any, specs: Any, dtype: Any = "float32") -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> array (HF layout, ``dtype``) for a jserve parameter tree
    and its weight declarations."""
    dt = _dtype(dtype)
    leaves = dict(named_leaves(params))
    declared = dict(named_leaves(specs))
    if leaves.keys() != declared.keys():
        missing = sorted(declared.keys() - leaves.keys())
        extra = sorted(leaves.keys() - declared.keys())
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for path, spec in declared.items():
        if spec.source.export is None:
            raise ValueError(f"weight {path} declares no export to Hugging Face layout")
        value = np.asarray(jax.device_get(leaves[path]))
        if tuple(value.shape) != spec.shape:
            raise ValueError(f"weight {path} has shape {value.shape}, config implies {spec.shape}")
        # Convert once from float32 so rounding happens a single time.
        tensors = spec.source.export(value.astype(np.float32))
        for name, t in zip(spec.source.names, tensors, strict=True):
            if name in out:
                raise ValueError(f"two weights export to the same tensor {name}")
            out[name] = np.ascontiguousarray(t.astype(dt))
    return out


def write_hf_dir(
    tensors: dict[str, np.ndarray],
    config: dict[str, Any],
    generation_config: dict[str, Any],
    out_dir: str | os.PathLike[str],
) -> str:
    """Writes model.safetensors, config.json and generation_config.json into out_dir."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, contents in (
        ("config.json", config),
        ("generation_config.json", generation_config),
    ):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(contents, f, indent=2, sort_keys=True)
            f.write("\n")
    return out_dir
