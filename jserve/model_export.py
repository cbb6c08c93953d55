"""Writing models out: Hugging Face directories and Orbax checkpoints.

The file formats live in ``checkpoints``; this module supplies what they take
from a model config (the family's weight declarations and the config.json
contents), the inverse of ``jserve.model_loader``.
"""

from __future__ import annotations

import os
from typing import Any

from checkpoints.hf_export import export_tensors, write_hf_dir
from checkpoints.orbax_ckpt import check_new_dir, save_orbax_checkpoint
from jserve.config import ModelConfig, config_to_dict, ids_or_list, load_config
from jserve.model_loader import load_params
from jserve.models import get_model
from jserve.models.quant import dequantize_params


def save_hf_checkpoint(
    params: Any,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    dtype: Any = "float32",
) -> str:
    """Writes config.json, model.safetensors and generation_config.json into out_dir.

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained``
    and with jserve's ``load_model``. Returns out_dir. Quantized weights are written
    dequantized (as float ``dtype``).
    """
    if cfg.quant is not None:
        params, cfg = dequantize_params(params), cfg.replace(quant=None)
    config = config_to_dict(cfg, dtype)
    tensors = export_tensors(params, get_model(cfg).param_specs(cfg), dtype)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": ids_or_list(cfg.eos_token_ids)}
    return write_hf_dir(tensors, config, gen, out_dir)


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: Any) -> ModelConfig:
    """Reads a Hugging Face directory and writes an Orbax checkpoint beside its config."""
    cfg = load_config(hf_dir)
    check_new_dir(out_dir)
    save_orbax_checkpoint(
        load_params(hf_dir, cfg, dtype, progress=True, check_finite=True),
        out_dir,
        dtype,
        copy_from=hf_dir,
    )
    return cfg
