"""Orbax checkpoints: ``jserve convert`` writes them, loading restores them sharded.

Layout of a converted directory:
  config.json, generation_config.json, tokenizer*.json   copied from the source
  jserve_checkpoint.json                                  format marker and dtype
  params/                                                 the Orbax PyTree checkpoint
Restoring reads, on each process, only the slices its devices hold.

The caller passes the params to save, or the weight declarations to restore
into (leaves with ``shape``); ``jserve.model_export.convert_hf_to_orbax`` ties
loading a Hugging Face directory to saving it here.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from checkpoints.errors import CheckpointError

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


def check_new_dir(out_dir: str | os.PathLike[str]) -> None:
    """Refuses an output directory that holds anything (so nothing is overwritten)."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new output directory")


def save_orbax_checkpoint(
    params: Any, out_dir: str, dtype: Any, copy_from: str | os.PathLike[str] | None = None
) -> None:
    """Writes ``params`` as an Orbax checkpoint, with the config and tokenizer files of
    ``copy_from`` (a Hugging Face directory) beside it."""
    check_new_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(out_dir, "params")), params)
    ckptr.wait_until_finished()
    for name in COPIED if copy_from is not None else ():
        src = os.path.join(copy_from, name)
        if os.path.isfile(src):
            shutil.copy(src, out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": "orbax", "version": 1, "dtype": str(np.dtype(dtype))}, f)


def load_orbax_params(path: str, specs: Any, dtype: Any, shardings: Any = None) -> dict[str, Any]:
    """Restores the weights ``specs`` declares straight into ``shardings`` (or the default
    device), cast to ``dtype``."""
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: default, specs)
    target = jax.tree_util.tree_map(
        lambda s, sharding: jax.ShapeDtypeStruct(
            s.shape, dtype if getattr(s, "dtype", None) is None else s.dtype, sharding=sharding
        ),
        specs,
        shardings,
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
