"""Loading and converting model weights (Hugging Face safetensors, Orbax).

This package does not import ``jserve``: callers pass the model's weight
declarations (a tree of leaves with ``shape`` and ``source``) and get trees of
the same structure back. Its errors are ``CheckpointError`` (re-exported as
``jserve.CheckpointError``).
"""

from checkpoints.errors import CheckpointError
from checkpoints.hf import load_hf_params
from checkpoints.orbax_ckpt import is_orbax_checkpoint, load_orbax_params, save_orbax_checkpoint
from checkpoints.safetensors_reader import SafetensorsReader
from checkpoints.source import HFSource, leaf_name, named_leaves

__all__ = [
    "CheckpointError",
    "HFSource",
    "SafetensorsReader",
    "is_orbax_checkpoint",
    "leaf_name",
    "load_hf_params",
    "load_orbax_params",
    "named_leaves",
    "save_orbax_checkpoint",
]
