"""Loading and converting model weights (Hugging Face safetensors, Orbax)."""

from checkpoints.hf import load_hf_params
from checkpoints.orbax_ckpt import convert_hf_to_orbax, is_orbax_checkpoint, load_orbax_params
from checkpoints.safetensors_reader import SafetensorsReader

__all__ = [
    "SafetensorsReader",
    "convert_hf_to_orbax",
    "is_orbax_checkpoint",
    "load_hf_params",
    "load_orbax_params",
]
