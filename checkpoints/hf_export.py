"""Writing jserve parameter trees as Hugging Face model directories.

The tensor names and layouts come from the same weight declarations the
loader uses: each ``HFSource`` carries ``export``, the inverse of its
``build``, so there is no second name table to keep in sync.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jserve.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jserve.models import llama
from jserve.models.params import iter_leaves, iter_specs

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


def _check_expressible(cfg: ModelConfig) -> None:
    """Raises ValueError when Hugging Face's class for the family cannot hold cfg."""
    fam = cfg.family
    problems = []
    if fam == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias:
            problems.append("Qwen2 always has q/k/v biases and never an o_proj bias")
    elif fam == "mistral":
        if cfg.qkv_bias or cfg.o_bias:
            problems.append("Mistral has no attention biases")
    elif cfg.qkv_bias != cfg.o_bias:
        problems.append("attention_bias covers q/k/v and o_proj together")
    if cfg.mlp_bias and fam != "llama":
        problems.append("only Llama has mlp_bias")
    if cfg.qk_norm != (fam == "qwen3"):
        problems.append("q/k norm exists exactly in Qwen3")
    windows = {w for w in cfg.sliding_windows if w is not None}
    if windows and fam == "llama":
        problems.append("Llama has no sliding-window attention")
    if len(windows) > 1:
        problems.append(f"one sliding window size for all layers, got {sorted(windows)}")
    if fam == "mistral" and windows and None in cfg.sliding_windows:
        problems.append("Mistral slides the window in every layer or none")
    if problems:
        raise ValueError(f"{cfg.architecture} cannot express this config: {'; '.join(problems)}")


def _ids(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def config_to_dict(cfg: ModelConfig, dtype: Any = "float32") -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents for cfg (inverse of ``config_from_dict``)."""
    _check_expressible(cfg)
    fam = cfg.family
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    dtype_name = _DTYPE_NAMES[_dtype(dtype)]
    out: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": fam,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_q_heads,
        "num_key_value_heads": cfg.source_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # transformers >= 5 reads rope_parameters; older versions the top-level keys.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _ids(cfg.eos_token_ids),
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)
    if fam in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if fam == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    window = next((w for w in cfg.sliding_windows if w is not None), None)
    if fam == "mistral":
        out["sliding_window"] = window
    elif fam in ("qwen2", "qwen3"):
        out["use_sliding_window"] = window is not None
        out["sliding_window"] = window
        first = next((i for i, w in enumerate(cfg.sliding_windows) if w is not None), None)
        out["max_window_layers"] = cfg.num_layers if first is None else first
        out["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in cfg.sliding_windows
        ]
    return out


def export_tensors(params: Any, cfg: ModelConfig, dtype: Any = "float32") -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> array (HF layout, ``dtype``) for a jserve parameter tree."""
    dt = _dtype(dtype)
    leaves = dict(iter_leaves(params))
    specs = dict(iter_specs(llama.param_specs(cfg)))
    if leaves.keys() != specs.keys():
        missing = sorted(specs.keys() - leaves.keys())
        extra = sorted(leaves.keys() - specs.keys())
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for path, spec in specs.items():
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


def save_hf_checkpoint(
    params: Any,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    dtype: Any = "float32",
) -> str:
    """Writes config.json, model.safetensors and generation_config.json into out_dir.

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained``
    and with jserve's ``load_hf_params``. Returns out_dir.
    """
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = config_to_dict(cfg, dtype)
    tensors = export_tensors(params, cfg, dtype)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": _ids(cfg.eos_token_ids)}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir
