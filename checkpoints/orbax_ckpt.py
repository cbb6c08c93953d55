"""Orbax checkpoints: ``jserve convert`` writes them, loading restores them sharded.

Layout of a converted directory:
  config.json, generation_config.json, tokenizer*.json   copied from the source
  jserve_checkpoint.json                                  format marker and dtype
  params/                                                 the Orbax PyTree checkpoint
Restoring reads, on each process, only the slices its devices hold.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from checkpoints.hf import load_hf_params
from jserve.config import ModelConfig, load_config
from jserve.errors import CheckpointError
from jserve.models import llama
from jserve.models.params import iter_leaves, map_specs

MARKER = "jserve_checkpoint.json"
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def is_orbax_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: Any) -> ModelConfig:
    """Reads a Hugging Face directory and writes an Orbax checkpoint beside its config."""
    cfg = load_config(hf_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new output directory")
    params = load_hf_params(hf_dir, cfg, dtype, progress=True)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(out_dir, "params")), params)
    ckptr.wait_until_finished()
    for name in COPIED:
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": "orbax", "version": 1, "dtype": str(np.dtype(dtype))}, f)
    return cfg


def load_orbax_params(
    path: str, cfg: ModelConfig, dtype: Any, shardings: Any = None
) -> dict[str, Any]:
    """Restores straight into ``shardings`` (or the default device), cast to ``dtype``."""
    specs = llama.param_specs(cfg)
    flat = dict(iter_leaves(shardings)) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = map_specs(
        lambda p, s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=flat.get(p, default)), specs
    )
    params_dir = os.path.abspath(os.path.join(path, "params"))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has no params/ directory; it is not a complete checkpoint")
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot restore {params_dir} for this config.json: {e}; was it converted from a "
            "different model?"
        ) from None
