"""Loading and converting model weights (Hugging Face safetensors, Orbax)."""

from checkpoints.hf import load_hf_params
from checkpoints.safetensors_reader import SafetensorsReader

__all__ = ["SafetensorsReader", "load_hf_params"]
